"""Run the Triton kernels under ``TRITON_INTERPRET=1`` on CPU against their torch twins (bit-exact).

Not a pytest module (the interpreter flag must be set before triton is imported, so tests/test_kernels.py runs
this file in a fresh subprocess). Exit status 0 and a final ``OK <n>`` line mean every case matched.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 before running this check")

import torch  # noqa: E402

from latent_relay.kernels import dispatch, reference  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    cases = 0
    shapes = [(1, 1), (5, 2), (17, 7), (40, 64), (3, 129), (33, 70), (0, 5), (4, 0)]
    for rows, n in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for bits in (8, 4, 2):
                for masked in (False, True):
                    x = (torch.randn(rows, n) * 4 - 1).to(dtype)
                    if rows and n:
                        x[0] = 2.5  # a constant row (scale 0)
                    valid = torch.rand(rows, n) > 0.3 if masked else None
                    if masked and rows > 1:
                        valid[1] = False  # a fully masked row
                    got = dispatch.quantize_pack(x, valid, bits, backend="triton")
                    want = reference.quantize_pack_ref(x, valid, bits)
                    for name, a, b in zip(("packed", "scale", "zero"), got, want):
                        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                            print(f"MISMATCH quantize {name} {rows}x{n} {dtype} bits={bits} masked={masked}")
                            return 1
                    y = dispatch.unpack_dequantize(*got, bits, n, dtype, backend="triton")
                    y_ref = reference.unpack_dequantize_ref(*want, bits, n, dtype)
                    if y.dtype != y_ref.dtype or not torch.equal(y, y_ref):
                        print(f"MISMATCH dequantize rows={rows} n={n} {dtype} bits={bits} masked={masked}")
                        return 1
                    cases += 1
    # the environment switch forces the Triton path too
    os.environ[dispatch.ENV_VAR] = "triton"
    assert dispatch.choose_backend(torch.zeros(1)) == "triton"
    print(f"OK {cases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
