/* The CPU steps of Orthogonal Backfill's fast path (arXiv 2604.13349; METHODS.md section 3), per (item, layer, KV
   head) problem, each problem's matrices kept in cache. Plain-torch twins (tested against these): the functions named
   in kernels/obf.py and compression.backfill_solvers.top_directions_subspace.

   evicted_gram    S = Y_D^T Y_D and u = w^T Y_D from a layer's values, Y_D the evicted rows in float32: one pass over
                   the values (bf16 / fp16 / fp32), S from its upper-triangle blocks only (half the flops), mirrored.
   project_gram    G = P S P, P = I - Q^T Q projecting out the kept span, in place.
   top_directions  top-p eigenvectors of G: orthogonal iteration with G^2, Gram-Schmidt, Jacobi Rayleigh-Ritz.

   All products go through one AVX2/FMA micro-kernel (a 6 x 16 block of rank-1 updates). Every problem is computed
   by one thread in a fixed order, so results do not depend on the thread count. Problems are shared out with
   OpenMP; loaded after torch, this library binds torch's own OpenMP runtime (same soname, libgomp.so.1), so it runs
   on torch's threads, with torch's thread count.

   Built by kernels/native.py with -O3 -mavx2 -mfma -mf16c -fopenmp. Needs d % 16 == 0 and a unit stride along d. */

#include <immintrin.h>
#include <math.h>
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

/* The one micro-kernel: out[i0:i0+6, j0:j0+16] (+)= sum over t in [t0, t1) of A(i0+a, t) * B[t, j0:j0+16], where
   A(i, t) = a[i * sa_i + t * sa_t] and B's row t starts at b + t * ldb. Twelve named accumulators (an array of them is
   spilled to the stack by GCC). */
static void block6(const float *a, int64_t sa_i, int64_t sa_t, const float *b, int64_t ldb, int t0, int t1, int i0,
                   int j0, float *out, int64_t ldo, int add) {
    float *o = out + (size_t)i0 * ldo + j0;
#define LD(r, h) (add ? _mm256_loadu_ps(o + (size_t)(r) * ldo + 8 * (h)) : _mm256_setzero_ps())
    __m256 c00 = LD(0, 0), c01 = LD(0, 1), c10 = LD(1, 0), c11 = LD(1, 1), c20 = LD(2, 0), c21 = LD(2, 1);
    __m256 c30 = LD(3, 0), c31 = LD(3, 1), c40 = LD(4, 0), c41 = LD(4, 1), c50 = LD(5, 0), c51 = LD(5, 1);
#undef LD
    const float *ai = a + (size_t)i0 * sa_i;
    for (int t = t0; t < t1; t++) {
        const float *brow = b + (size_t)t * ldb + j0, *at = ai + (size_t)t * sa_t;
        __m256 b0 = _mm256_loadu_ps(brow), b1 = _mm256_loadu_ps(brow + 8), s;
#define ROW(r, lo, hi)                                  \
    s = _mm256_broadcast_ss(at + (size_t)(r) * sa_i);   \
    lo = _mm256_fmadd_ps(s, b0, lo);                    \
    hi = _mm256_fmadd_ps(s, b1, hi)
        ROW(0, c00, c01);
        ROW(1, c10, c11);
        ROW(2, c20, c21);
        ROW(3, c30, c31);
        ROW(4, c40, c41);
        ROW(5, c50, c51);
#undef ROW
    }
#define ST(r, h, v) _mm256_storeu_ps(o + (size_t)(r) * ldo + 8 * (h), v)
    ST(0, 0, c00); ST(0, 1, c01); ST(1, 0, c10); ST(1, 1, c11); ST(2, 0, c20); ST(2, 1, c21);
    ST(3, 0, c30); ST(3, 1, c31); ST(4, 0, c40); ST(4, 1, c41); ST(5, 0, c50); ST(5, 1, c51);
#undef ST
}

/* The same for a single row i0 (rows left over when a block of rows is not a multiple of 6). */
static void block1(const float *a, int64_t sa_i, int64_t sa_t, const float *b, int64_t ldb, int t0, int t1, int i0,
                   int j0, float *out, int64_t ldo, int add) {
    float *o = out + (size_t)i0 * ldo + j0;
    __m256 c0 = add ? _mm256_loadu_ps(o) : _mm256_setzero_ps();
    __m256 c1 = add ? _mm256_loadu_ps(o + 8) : _mm256_setzero_ps();
    const float *ai = a + (size_t)i0 * sa_i;
    for (int t = t0; t < t1; t++) {
        const float *brow = b + (size_t)t * ldb + j0;
        __m256 s = _mm256_broadcast_ss(ai + (size_t)t * sa_t);
        c0 = _mm256_fmadd_ps(s, _mm256_loadu_ps(brow), c0);
        c1 = _mm256_fmadd_ps(s, _mm256_loadu_ps(brow + 8), c1);
    }
    _mm256_storeu_ps(o, c0);
    _mm256_storeu_ps(o + 8, c1);
}

/* Rows per pass over the blocks: 64 rows of d = 128 floats (32 KiB) stay in L1/L2 while every block reads them. */
#define ROWS_PER_PASS 64

/* s (d x d) = y^T y for y (n x d, rows of length d): the blocks that touch the upper triangle, then the lower
   triangle mirrored. */
static void gram_upper_mirrored(const float *y, int n, int d, float *s) {
    if (n == 0) {
        memset(s, 0, (size_t)d * d * sizeof(float));
        return;
    }
    for (int t0 = 0; t0 < n; t0 += ROWS_PER_PASS) {
        int t1 = t0 + ROWS_PER_PASS < n ? t0 + ROWS_PER_PASS : n, add = t0 > 0;
        for (int j0 = 0; j0 < d; j0 += 16) {
            int i0 = 0;
            for (; i0 + 6 <= j0 + 16 && i0 + 6 <= d; i0 += 6) block6(y, 1, d, y, d, t0, t1, i0, j0, s, d, add);
            for (; i0 < j0 + 16 && i0 < d; i0++) block1(y, 1, d, y, d, t0, t1, i0, j0, s, d, add);
        }
    }
    for (int i = 1; i < d; i++)
        for (int j = 0; j < i; j++) s[(size_t)i * d + j] = s[(size_t)j * d + i];
}

/* out (m x d) = z (m x k, rows of length k) @ g (k x d); d % 16 == 0. */
static void matmul_rows(const float *z, int m, int k, const float *g, int d, float *out) {
    for (int j0 = 0; j0 < d; j0 += 16) {
        int i0 = 0;
        for (; i0 + 6 <= m; i0 += 6) block6(z, k, 1, g, d, 0, k, i0, j0, out, d, 0);
        for (; i0 < m; i0++) block1(z, k, 1, g, d, 0, k, i0, j0, out, d, 0);
    }
}

/* A zeroed, 64-byte aligned work block of `bytes` for one thread; NULL (and *failed = 2) when out of memory. */
static void *work_block(size_t bytes, int *failed) {
    void *block = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (block != NULL) {
        memset(block, 0, bytes);
    } else {
#pragma omp atomic write
        *failed = 2;
    }
    return block;
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
    int failed = 0;
#pragma omp parallel
    {
        float *rows = (float *)work_block((size_t)(tokens > 0 ? tokens : 1) * d * sizeof(float), &failed);
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

/* ------------------------------------------------------------------------------- projecting out the kept span */

/* In place, for each problem's symmetric S (d x d) and Q^T (k x d: orthonormal rows, or zero rows): the residual Gram
   G = P S P with P = I - Q^T Q, as G = S - E - E^T with E = (S Q^T - Q^T (Q S Q^T) / 2) Q (d x d x k products instead
   of d x d x d ones), the formula of the torch twin (compression.backfill_solvers.layer_residual_gram). G stays
   exactly symmetric. Returns 0, 1 for an unsupported d or k, 2 when a thread's work space could not be allocated. */
int project_gram(float *gram, const float *qt, int64_t problems, int d, int k) {
    if (d <= 0 || d % 16 != 0 || k < 0) return 1;
    if (k == 0) return 0;
    int kp = (k + 15) / 16 * 16; /* Q^T padded with zero rows to a multiple of the micro-kernel's width */
    int failed = 0;
#pragma omp parallel
    {
        size_t dk = (size_t)d * kp;
        float *work = (float *)work_block((4 * dk + (size_t)kp * kp + (size_t)d * d) * sizeof(float), &failed);
        float *q = work, *qtr = q + dk, *a = qtr + dk, *c = a + dk, *b = c + dk, *e = b + (size_t)kp * kp;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < problems; i++) {
            if (work == NULL) continue;
            float *g = gram + (size_t)i * d * d;
            const float *qi = qt + (size_t)i * k * d;
            memcpy(q, qi, (size_t)k * d * sizeof(float));
            for (int r = 0; r < k; r++)
                for (int col = 0; col < d; col++) qtr[(size_t)col * kp + r] = qi[(size_t)r * d + col];
            matmul_rows(g, d, d, qtr, kp, a);  /* A = S Q^T            (d x kp) */
            matmul_rows(q, kp, d, a, kp, b);   /* B = Q S Q^T          (kp x kp) */
            matmul_rows(qtr, d, kp, b, kp, c); /* Q^T B                (d x kp) */
            for (size_t x = 0; x < (size_t)d * kp; x++) a[x] -= 0.5f * c[x];
            matmul_rows(a, d, kp, q, d, e); /* E = (A - Q^T B / 2) Q (d x d) */
            for (int r0 = 0; r0 < d; r0 += 16) /* G = S - E - E^T, in 16 x 16 tiles so that E^T is read from cache */
                for (int c0 = 0; c0 < d; c0 += 16)
                    for (int r = r0; r < r0 + 16; r++)
                        for (int col = c0; col < c0 + 16; col++)
                            g[(size_t)r * d + col] -= e[(size_t)r * d + col] + e[(size_t)col * d + r];
        }
        free(work);
    }
    return failed;
}

/* ------------------------------------------------------------------------------------------ top-p directions */

/* x . y over n floats (n % 8 == 0), accumulated in double with AVX2, in a fixed order. */
static double dot_f32(const float *x, const float *y, int n) {
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (int c = 0; c < n; c += 8) {
        __m256 a = _mm256_loadu_ps(x + c), b = _mm256_loadu_ps(y + c);
        acc0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_castps256_ps128(b)),
                               acc0);
        acc1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)),
                               acc1);
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

/* Rows of z (m x d) made orthonormal: modified Gram-Schmidt, twice ("twice is enough"), with the dot products in
   double. A row left with less than 1e-6 of its norm once the rows before it are removed becomes zero (as in the
   torch twin, zero rows stay zero; a block that loses rows shows up as a steep spectrum, which the caller hands to
   eigh). */
static void orthonormalize_rows(float *z, int m, int d) {
    for (int pass = 0; pass < 2; pass++)
        for (int a = 0; a < m; a++) {
            float *za = z + (size_t)a * d;
            double before = dot_f32(za, za, d);
            for (int j = 0; j < a; j++) {
                const float *zj = z + (size_t)j * d;
                float proj = (float)dot_f32(za, zj, d);
                for (int c = 0; c < d; c++) za[c] -= proj * zj[c];
            }
            double after = dot_f32(za, za, d);
            float scale = (before > 0.0 && after > 1e-12 * before) ? (float)(1.0 / sqrt(after)) : 0.0f;
            for (int c = 0; c < d; c++) za[c] *= scale;
        }
}

/* Eigen-decomposition of the symmetric n x n matrix a (double, destroyed) by cyclic Jacobi rotations: eigenvalues in
   eval, eigenvector k in column k of v (row-major n x n). Accurate to working precision for these small n. */
static void jacobi_eigh(double *a, int n, double *v, double *eval) {
    for (int i = 0; i < n * n; i++) v[i] = 0.0;
    for (int i = 0; i < n; i++) v[i * n + i] = 1.0;
    for (int sweep = 0; sweep < 50; sweep++) {
        double off = 0.0, all = 0.0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                double x = a[i * n + j] * a[i * n + j];
                all += x;
                if (i != j) off += x;
            }
        if (off <= 1e-26 * all) break; /* off-diagonal below 1e-13 of the matrix, relative */
        for (int p = 0; p < n - 1; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = a[p * n + q];
                if (fabs(apq) <= 1e-15 * sqrt(fabs(a[p * n + p] * a[q * n + q]))) continue; /* a rotation by < 1e-15 */
                double tau = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                double t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
                double c = 1.0 / sqrt(1.0 + t * t), s = t * c;
                for (int k = 0; k < n; k++) { /* columns p, q */
                    double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) { /* rows p, q */
                    double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) {
                    double vkp = v[k * n + p], vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
    }
    for (int i = 0; i < n; i++) eval[i] = a[i * n + i];
}

/* Top-p eigenvectors of each symmetric PSD d x d matrix in gram (problems x d x d) by orthogonal iteration, the
   torch twin's algorithm (compression.backfill_solvers.top_directions_subspace with orth_every = 2): from the start
   block (width x d, orthonormal rows), `reps` products with G^2 (built as G^T G from the symmetric half), each
   followed by a re-orthonormalisation, then Rayleigh-Ritz with G. Writes the directions as rows of c
   (problems x p x d) and steep[i] = 1 where the p-th Ritz value is below steep_ratio of the first (the caller hands
   those to eigh).
   Returns 0, 1 for unsupported sizes, 2 when a thread's work space could not be allocated. */
int top_directions(const float *gram, int64_t problems, int d, int p, int width, int reps, const float *start,
                   float steep_ratio, float *c, uint8_t *steep) {
    if (d <= 0 || d % 16 != 0 || p <= 0 || width < p || width > d || reps < 1) return 1;
    int failed = 0;
#pragma omp parallel
    {
        size_t wd = (size_t)width * d, ww = (size_t)width * width;
        double *t = (double *)work_block((2 * ww + width) * sizeof(double) + ((size_t)d * d + 2 * wd) * sizeof(float),
                                         &failed);
        double *v = t + ww, *eval = v + ww;
        float *g2 = (float *)(eval + width), *z = g2 + (size_t)d * d, *y = z + wd;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < problems; i++) {
            if (t == NULL) continue;
            const float *g = gram + (size_t)i * d * d;
            gram_upper_mirrored(g, d, d, g2); /* G^T G = G^2 */
            memcpy(z, start, wd * sizeof(float));
            for (int r = 0; r < reps; r++) {
                matmul_rows(z, width, d, g2, d, y);
                float *swap = z;
                z = y;
                y = swap;
                orthonormalize_rows(z, width, d);
            }
            matmul_rows(z, width, d, g, d, y); /* Z G */
            for (int a = 0; a < width; a++) /* T = (Z G) Z^T, then made exactly symmetric */
                for (int b = 0; b < width; b++) {
                    t[a * width + b] = dot_f32(y + (size_t)a * d, z + (size_t)b * d, d);
                }
            for (int a = 0; a < width; a++)
                for (int b = 0; b < a; b++) {
                    double m = 0.5 * (t[a * width + b] + t[b * width + a]);
                    m = isfinite(m) ? m : 0.0;
                    t[a * width + b] = t[b * width + a] = m;
                }
            for (int a = 0; a < width; a++)
                if (!isfinite(t[a * width + a])) t[a * width + a] = 0.0;
            jacobi_eigh(t, width, v, eval);
            /* the p largest Ritz values, largest first (selection by repeated maximum: width is small) */
            float *ci = c + (size_t)i * p * d;
            double first = 0.0, last = 0.0;
            for (int j = 0; j < p; j++) {
                int best = -1;
                for (int k = 0; k < width; k++)
                    if (!isnan(eval[k]) && (best < 0 || eval[k] > eval[best])) best = k;
                if (best < 0) best = j;
                if (j == 0) first = eval[best];
                last = eval[best];
                eval[best] = NAN;
                float *cj = ci + (size_t)j * d; /* C_j = sum_a U[a, best] Z_a */
                for (int col = 0; col < d; col++) cj[col] = 0.0f;
                for (int a = 0; a < width; a++) {
                    float coef = (float)v[a * width + best];
                    const float *za = z + (size_t)a * d;
                    for (int col = 0; col < d; col++) cj[col] += coef * za[col];
                }
            }
            steep[i] = last < (double)steep_ratio * first;
        }
        free(t);
    }
    return failed;
}
