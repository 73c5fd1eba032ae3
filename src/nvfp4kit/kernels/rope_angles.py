"""cos/sin of RoPE angles inside Triton kernels, accurate at long contexts.

At position p a pair rotates by p * inv_freq rad: up to ~2.6e5 rad at 256K tokens. Reducing the fp32 angle to
[-pi, pi] with 2*pi split in three (Cody-Waite) before the sin/cos keeps the result as accurate as torch's
(which rounds the same fp32 angle) whatever sin/cos approximation the backend uses. So on the GPU the reduced
angle goes to the hardware's approximate sin/cos (MUFU, absolute error ~5e-7 on [-pi, pi]) rather than libdevice's
sinf/cosf, whose own range reduction and slow path made the rotated-key loop of a global decode layer 2,505
instructions a key tile instead of 1,176, with register spills (sm_90, session 30).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from nvfp4kit.kernels.configs import interpreting

# 2*pi = HI + MID + LO; HI and MID have 8 significant bits, so k * HI and k * MID are exact for k < 2^16
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_MID = tl.constexpr(0.0019378662109375)
_TWO_PI_LO = tl.constexpr(-2.559031372584286e-06)
# the interpreter has no libdevice; Triton picks interpreted or compiled kernels at import time, and so does this
_HARDWARE_TRIG = tl.constexpr(not interpreting())


@triton.jit
def cos_sin(angle, PRECISE: tl.constexpr = False):
    """(cos, sin) of fp32 angles up to ~1e6 rad. PRECISE takes libdevice's sinf/cosf after the reduction (error
    below fp32's rounding of the angle): for fp32 outputs (fp32 models) and where a few angles a head are all
    there is (the q / stored-K RoPE of `qkv_rope`), so only the attention kernels' derived keys use MUFU."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = angle - k * _TWO_PI_HI
    r = r - k * _TWO_PI_MID
    r = r - k * _TWO_PI_LO
    if _HARDWARE_TRIG and not PRECISE:
        cos, sin = libdevice.fast_cosf(r), libdevice.fast_sinf(r)
    else:
        cos, sin = tl.cos(r), tl.sin(r)
    return cos, sin
