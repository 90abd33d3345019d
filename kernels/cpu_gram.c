/* Gram matrices of evicted value rows on the CPU: the first step of Orthogonal Backfill's fast path
   (arXiv 2604.13349; METHODS.md section 3). Plain-torch twin: kernels.reference.evicted_gram_ref.

   For each (item, head) problem p of one layer, with value rows v[t] (t over the prompt span), an evicted-slot mask
   and weights w (zero off the evicted slots):

       Y_D  = the evicted rows, in float32
       S[p] = Y_D^T Y_D      (d x d, symmetric)
       u[p] = w^T Y_D        (d)

   One pass over the values: each problem's evicted rows are converted to float32 into a per-thread buffer (L2-sized
   for d = 128 and a few hundred tokens) and S is built from the upper-triangle 6 x 16 blocks only (half the flops of
   a general matrix product) with AVX2 FMA, then mirrored. Every problem is summed by one thread in a fixed order,
   so the result does not depend on the thread count. Problems are shared out with OpenMP; loaded after torch, this
   library binds torch's own OpenMP runtime (same soname), so it uses torch's threads and thread count.

   Built by kernels/native.py with -O3 -mavx2 -mfma -mf16c -fopenmp. Needs d % 16 == 0 and a unit stride along d. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1, DTYPE_FLOAT16 = 2 };

/* One row of d values (d % 8 == 0) to float32. */
static void load_row(const void *src, int dtype, int d, float *dst) {
    if (dtype == DTYPE_FLOAT32) {
        memcpy(dst, src, (size_t)d * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    for (int c = 0; c < d; c += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(s + c));
        __m256 f = dtype == DTYPE_BFLOAT16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                           : _mm256_cvtph_ps(h);
        _mm256_storeu_ps(dst + c, f);
    }
}

/* out[i0:i0+6, j0:j0+16] (+)= sum over rows t in [t0, t1) of y[t, i0+a] * y[t, j0:j0+16]. Twelve named accumulators
   (an array of them is spilled to the stack by GCC). */
static void block6(const float *y, int t0, int t1, int d, int i0, int j0, float *out, int add) {
    float *o = out + (size_t)i0 * d + j0;
#define LD(a, h) (add ? _mm256_loadu_ps(o + (size_t)(a) * d + 8 * (h)) : _mm256_setzero_ps())
    __m256 c00 = LD(0, 0), c01 = LD(0, 1), c10 = LD(1, 0), c11 = LD(1, 1), c20 = LD(2, 0), c21 = LD(2, 1);
    __m256 c30 = LD(3, 0), c31 = LD(3, 1), c40 = LD(4, 0), c41 = LD(4, 1), c50 = LD(5, 0), c51 = LD(5, 1);
#undef LD
    const float *row = y + (size_t)t0 * d;
    for (int t = t0; t < t1; t++, row += d) {
        __m256 b0 = _mm256_loadu_ps(row + j0), b1 = _mm256_loadu_ps(row + j0 + 8), s;
        s = _mm256_broadcast_ss(row + i0 + 0);
        c00 = _mm256_fmadd_ps(s, b0, c00);
        c01 = _mm256_fmadd_ps(s, b1, c01);
        s = _mm256_broadcast_ss(row + i0 + 1);
        c10 = _mm256_fmadd_ps(s, b0, c10);
        c11 = _mm256_fmadd_ps(s, b1, c11);
        s = _mm256_broadcast_ss(row + i0 + 2);
        c20 = _mm256_fmadd_ps(s, b0, c20);
        c21 = _mm256_fmadd_ps(s, b1, c21);
        s = _mm256_broadcast_ss(row + i0 + 3);
        c30 = _mm256_fmadd_ps(s, b0, c30);
        c31 = _mm256_fmadd_ps(s, b1, c31);
        s = _mm256_broadcast_ss(row + i0 + 4);
        c40 = _mm256_fmadd_ps(s, b0, c40);
        c41 = _mm256_fmadd_ps(s, b1, c41);
        s = _mm256_broadcast_ss(row + i0 + 5);
        c50 = _mm256_fmadd_ps(s, b0, c50);
        c51 = _mm256_fmadd_ps(s, b1, c51);
    }
#define ST(a, h, v) _mm256_storeu_ps(o + (size_t)(a) * d + 8 * (h), v)
    ST(0, 0, c00); ST(0, 1, c01); ST(1, 0, c10); ST(1, 1, c11); ST(2, 0, c20); ST(2, 1, c21);
    ST(3, 0, c30); ST(3, 1, c31); ST(4, 0, c40); ST(4, 1, c41); ST(5, 0, c50); ST(5, 1, c51);
#undef ST
}

/* The same for a single row i0 (the rows left over when d is not a multiple of 6). */
static void block1(const float *y, int t0, int t1, int d, int i0, int j0, float *out, int add) {
    float *o = out + (size_t)i0 * d + j0;
    __m256 c0 = add ? _mm256_loadu_ps(o) : _mm256_setzero_ps();
    __m256 c1 = add ? _mm256_loadu_ps(o + 8) : _mm256_setzero_ps();
    const float *row = y + (size_t)t0 * d;
    for (int t = t0; t < t1; t++, row += d) {
        __m256 s = _mm256_broadcast_ss(row + i0);
        c0 = _mm256_fmadd_ps(s, _mm256_loadu_ps(row + j0), c0);
        c1 = _mm256_fmadd_ps(s, _mm256_loadu_ps(row + j0 + 8), c1);
    }
    _mm256_storeu_ps(o, c0);
    _mm256_storeu_ps(o + 8, c1);
}

/* Rows per pass over the blocks: 64 rows of d = 128 floats (32 KiB) stay in L1/L2 while every block reads them. */
#define ROWS_PER_PASS 64

/* s (d x d) = y^T y for y (n x d): the blocks that touch the upper triangle, then the lower triangle mirrored. */
static void gram_upper_mirrored(const float *y, int n, int d, float *s) {
    if (n == 0) {
        memset(s, 0, (size_t)d * d * sizeof(float));
        return;
    }
    for (int t0 = 0; t0 < n; t0 += ROWS_PER_PASS) {
        int t1 = t0 + ROWS_PER_PASS < n ? t0 + ROWS_PER_PASS : n, add = t0 > 0;
        for (int j0 = 0; j0 < d; j0 += 16) {
            int i0 = 0;
            for (; i0 + 6 <= j0 + 16 && i0 + 6 <= d; i0 += 6) block6(y, t0, t1, d, i0, j0, s, add);
            for (; i0 < j0 + 16 && i0 < d; i0++) block1(y, t0, t1, d, i0, j0, s, add);
        }
    }
    for (int i = 1; i < d; i++)
        for (int j = 0; j < i; j++) s[(size_t)i * d + j] = s[(size_t)j * d + i];
}

/* values: element (b, h, t, c) at values[b * stride_b + h * stride_h + t * stride_t + c] (element strides), problem
   p = b * heads + h for p < problems; evict (uint8) and w (float32) are contiguous [problems, tokens]; s is
   [problems, d, d] and u [problems, d], both float32 and contiguous. Returns 0, 1 for an unsupported d or dtype,
   2 when a thread's row buffer could not be allocated. */
int evicted_gram(const void *values, int dtype, int64_t stride_b, int64_t stride_h, int64_t stride_t,
                 int64_t problems, int heads, int tokens, int d, const uint8_t *evict, const float *w, float *s,
                 float *u) {
    if (d <= 0 || d % 16 != 0 || dtype < DTYPE_FLOAT32 || dtype > DTYPE_FLOAT16 || heads <= 0) return 1;
    size_t esize = dtype == DTYPE_FLOAT32 ? 4 : 2;
    size_t buffer_bytes = ((size_t)(tokens > 0 ? tokens : 1) * d * sizeof(float) + 63) / 64 * 64;
    int failed = 0;
#pragma omp parallel
    {
        float *rows = (float *)aligned_alloc(64, buffer_bytes);
        if (rows == NULL) {
#pragma omp atomic write
            failed = 2;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < problems; p++) {
            if (rows == NULL) continue;
            int64_t b = p / heads, h = p % heads;
            const char *base = (const char *)values + (size_t)(b * stride_b + h * stride_h) * esize;
            const uint8_t *ev = evict + p * tokens;
            const float *wp = w + p * tokens;
            float *up = u + p * d;
            memset(up, 0, (size_t)d * sizeof(float));
            int n = 0;
            for (int t = 0; t < tokens; t++) {
                if (!ev[t]) continue;
                float *row = rows + (size_t)n * d;
                load_row(base + (size_t)t * stride_t * esize, dtype, d, row);
                float wt = wp[t];
                for (int c = 0; c < d; c++) up[c] += wt * row[c];
                n++;
            }
            gram_upper_mirrored(rows, n, d, s + (size_t)p * d * d);
        }
        free(rows);
    }
    return failed;
}
