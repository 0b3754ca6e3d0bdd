"""Measure what a graph really allocates: the peak of live tensor bytes during one call.

CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``, so a
``TorchDispatchMode`` watches every op below autograd (inside vmap/jvp too):
each new storage an op returns is counted until the last tensor using it is
garbage collected. Tensors that existed before the call (inputs, weights,
posterior buffers) are not counted, which matches the cost model's split into
static bytes and working memory. The same mode runs on fake tensors, where it
measures without allocating anything.

:func:`profiler_peak` is the independent check at the allocator level: with
``profile_memory=True`` torch's profiler records every allocation and free of
the CPU allocator, including scratch memory inside kernels that no op
returns.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created while active: ``live`` now, ``peak`` at most.

    A storage counts until its last owner (a tensor, or a vmap/jvp wrapper
    holding it in C++) lets it go, which a weak reference to the storage
    itself sees; frees are picked up before and after every op. ``points`` records
    ``live`` after every op that allocated (the program points of the
    liveness walk).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.points: list[int] = []
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def reset_points(self) -> None:
        self.points = []

    def sweep(self) -> None:
        """Forget storages that have been freed since the last op."""
        for key, (ref, nbytes) in list(self._storages.items()):
            if ref.expired():
                self.live -= nbytes
                del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Storages freed since the last op are gone before this op allocates, as in the allocator.
        self.sweep()
        before = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.sweep()
        allocated = False
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = _storage_key(tensor)
            if key in self._storages or key in before:
                continue
            storage = tensor.untyped_storage()
            self._storages[key] = (StorageWeakRef(storage), storage.nbytes())
            self.live += storage.nbytes()
            allocated = True
        if allocated:
            self.peak = max(self.peak, self.live)
            self.points.append(self.live)
        return out


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def measure_peak(fn, *args) -> int:
    """Peak bytes of tensors allocated and live at the same time while running ``fn(*args)``."""
    with torch.no_grad(), LiveBytes() as tracker:
        result = fn(*args)
        del result
        tracker.sweep()
    return tracker.peak


def profiler_peak(fn, *args) -> int:
    """Peak bytes allocated during ``fn(*args)`` by CPU allocator events that torch.profiler records.

    Every allocation and free of torch's CPU allocator is a ``[memory]`` event
    with a signed byte count; the peak is the largest running sum.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args)
        del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
