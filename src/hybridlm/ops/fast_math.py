"""Vectorisable elementwise math for numba kernels.

pip's llvmlite ships without SVML, so ``math.exp`` inside a numba loop compiles to a scalar libm call per element; in
the selective scan that call alone costs several times the rest of the recurrence (docs/performance.md, "Figures
behind the kernels"). ``vexp`` below is built from multiplies, adds, a floor and an integer shift, which LLVM turns
into SIMD code when it sits in an inner loop over contiguous data.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_LOG2E = 1.4426950408889634
# ln 2 split in two (Cody & Waite): k * _LN2_HI is exact in float32 for |k| < 2**9, so the reduced
# argument r = x - k ln2 keeps its low bits.
_LN2_HI = 0.693145751953125
_LN2_LO = 1.4286068203094172e-06


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (truncate + bitcast: no work, so it vectorises)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


def vexp(x):  # pragma: no cover - replaced by the overload below inside numba code
    """exp(x); float32: a polynomial accurate to ~2 ulp that vectorises; float64: math.exp."""
    return math.exp(x)


@overload(vexp, jit_options={"fastmath": False})
def _vexp_impl(x):
    if x == types.float32:
        lo, hi = np.float32(-87.0), np.float32(88.0)  # exp(-87) ~ 1.6e-38 is still a normal float32
        log2e, ln2_hi, ln2_lo = np.float32(_LOG2E), np.float32(_LN2_HI), np.float32(_LN2_LO)
        half, one = np.float32(0.5), np.float32(1.0)
        # Taylor coefficients 1/j! of exp on |r| <= ln2/2: the degree-7 remainder is < 2e-9 relative.
        c2, c3, c4 = np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24)
        c5, c6, c7 = np.float32(1 / 120), np.float32(1 / 720), np.float32(1 / 5040)

        def impl(x):
            x = min(max(x, lo), hi)
            k = np.floor(x * log2e + half)  # float32 (math.floor would give an int64)
            r = (x - k * ln2_hi) - k * ln2_lo
            p = one + r * (one + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))
            # 2**k built directly in the exponent field.
            return p * _int32_bits_as_float32((np.int32(k) + 127) << 23)

        return impl
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)
    return None


@njit(cache=True)
def _vexp_array(x, out):
    for i in range(x.size):
        out[i] = vexp(x[i])


def vexp_array(x: np.ndarray) -> np.ndarray:
    """``vexp`` over a flat array (for tests and for measuring the exp rate)."""
    out = np.empty_like(x)
    _vexp_array(x, out)
    return out
