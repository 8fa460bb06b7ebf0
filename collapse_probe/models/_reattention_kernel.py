"""The Triton kernel of ``reattention_triton`` (imports triton: import this module only through ``_kernel()``).

    >>> from collapse_probe.models.reattention_triton import head_affine   # the wrapper; this module is internal
"""

import triton
import triton.language as tl


@triton.jit
def head_affine_kernel(a_ptr, w_ptr, c_ptr, y_ptr, P, H: tl.constexpr, HP: tl.constexpr, HAS_C: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """y[b, g, p] = sum_h w[g, h] a[b, h, p] + c[g]; one program: image b, pixels [p0, p0 + BLOCK_P) of all heads."""
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_g = tl.arange(0, HP)  # heads padded to a power of two, masked
    gmask = offs_g < H
    base = b.to(tl.int64) * H * P
    # tl.full, not tl.zeros: tl.zeros is itself @jit, which the interpreter cannot run once triton was imported first
    acc = tl.full([HP, BLOCK_P], 0.0, tl.float32)
    for h in tl.static_range(H):  # H is tiny: unrolled rank-1 updates, each A row read once
        a_row = tl.load(a_ptr + base + h * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
        w_col = tl.load(w_ptr + offs_g * H + h, mask=gmask, other=0.0).to(tl.float32)
        acc += w_col[:, None] * a_row[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + offs_g, mask=gmask, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + base + offs_g[:, None] * P + offs_p[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=gmask[:, None] & pmask[None, :])
