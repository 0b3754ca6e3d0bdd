"""Measure what a graph really allocates: the peak of live tensor bytes during one call.

CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``, so a
``TorchDispatchMode`` watches every op below autograd (inside vmap/jvp too):
each new storage an op returns is counted until the last tensor using it is
garbage collected. Tensors that existed before the call (inputs, weights,
posterior buffers) are not counted, which matches the cost model's split into
static bytes and working memory. The same mode runs on fake tensors, where it
measures without allocating anything.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created while active: ``live`` now, ``peak`` at most.

    ``points`` records ``live`` after every op that allocated (the program
    points of the liveness walk).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.points: list[int] = []
        self._users: dict[int, list[int]] = {}

    def reset_points(self) -> None:
        self.points = []

    def _release(self, key: int) -> None:
        entry = self._users.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._users[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        allocated = False
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = _storage_key(tensor)
            if key in before and key not in self._users:
                continue
            entry = self._users.get(key)
            if entry is None:
                entry = self._users[key] = [tensor.untyped_storage().nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
                allocated = True
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        if allocated:
            self.points.append(self.live)
        return out


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def measure_peak(fn, *args) -> int:
    """Peak bytes of tensors allocated and live at the same time while running ``fn(*args)``."""
    with torch.no_grad(), LiveBytes() as tracker:
        result = fn(*args)
        del result
    return tracker.peak
