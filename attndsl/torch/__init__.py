"""attndsl in PyTorch (the `torch` extra: pip install 'attndsl[torch]'); docs/torch.md.

    import attndsl.torch as at
    out      = at.attention(spec, q, k, v, **params_and_indices)       # a differentiable op
    out, lse = at.attention(spec, q, k, v, return_lse=True, **params_and_indices)
    layer    = at.Attention(spec, **sizes_and_initial_params)          # owns the params
    out      = layer(q, k, v, **inputs_and_indices)
    out      = at.distributed.ring_attention(spec, q, k, v, layout="zigzag", **params)
"""

from __future__ import annotations

from . import distributed
from .module import Attention
from .ops import attention

__all__ = ["Attention", "attention", "distributed"]
