"""Ops whose output depends only on their arguments' shapes, dtypes and constants, never on values.

``zeros_like(h)`` of an uncertain ``h`` is still a constant: the pair pass
gives these ops no covariance, and decomposition leaves them alone.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

VALUE_INDEPENDENT = frozenset({
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.empty_strided.default,
})
