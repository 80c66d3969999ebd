"""What both Triton kernels share: the optional triton import and the online update of one side.

triton is optional (the `gpu` extra): without it `triton` and `tl` are None, the kernels are not
defined and every caller takes the torch path. Tests that run the kernels under Triton's CPU
interpreter reload this module first, then the kernel modules (the interpreter is chosen when a
kernel is decorated: see tests/test_fused_scoring.py).
"""

from __future__ import annotations

try:  # triton is optional (the `gpu` extra); the torch path needs nothing beyond torch.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def online_update(x, e_mask_d, m, z, h, g):
        """Fold one block x [BLOCK] into the running (max m, sum z of e^(x-m), h = sum e (x-m),
        g = sum e * d) of one side; e_mask_d is d = s - t for the block. Returns the new state."""
        NEG: tl.constexpr = float("-inf")
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == NEG, 0.0, m_new)  # all -inf so far: any finite shift works
        alpha = tl.exp(m - shift)  # 0 when m = -inf
        e = tl.exp(x - shift)  # 0 at -inf entries (and masked tail)
        live = e > 0
        # Rescale h from shift m to m_new: h' = alpha * (h + (m - m_new) z); guarded when z = 0.
        h_old = tl.where(z > 0, alpha * (h + (m - shift) * z), 0.0)
        g_old = tl.where(alpha > 0, alpha * g, 0.0)  # g may be +-inf; alpha = 0 means "no mass yet"
        h = h_old + tl.sum(tl.where(live, e * (x - shift), 0.0), 0)
        g = g_old + tl.sum(tl.where(live, e * e_mask_d, 0.0), 0)
        z = alpha * z + tl.sum(e, 0)
        return m_new, z, h, g


__all__ = ["triton", "tl", "triton_available", "online_update"]
