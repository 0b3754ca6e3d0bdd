"""``fxstream.predict``: one Predictive over a whole loader, in dataset order, on one process or many.

Under an initialised ``torch.distributed`` process group (``torchrun``) with more than one rank, the
loader's dataset is cut into contiguous shards, one per rank (rank r takes samples
[r N / W, (r+1) N / W)), each rank runs its shard through its streamlined model, and the means,
variances (full covariances where tracked) and targets are gathered on every rank in dataset order.
The same code runs on gloo (CPU) and NCCL (GPU): the gather uses the device the predictions are on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() on the loader an extra time

from .errors import FxstreamError
from .predictive import Predictive

Batch = Any


def split_batch(batch: Batch) -> tuple[tuple, torch.Tensor | None]:
    """A loader's batch as (model inputs, targets): ``(x, y)`` or ``(x1, x2, ..., y)``; a bare tensor is
    inputs only."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return tuple(batch[:-1]), batch[-1]
    raise FxstreamError(
        f"a batch must be a tensor of inputs or a tuple (inputs..., targets), got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )


def _device(model: Callable) -> torch.device | None:
    inner = getattr(model, "model", model)
    if isinstance(inner, torch.nn.Module):
        for p in inner.parameters():
            return p.device
    return None


def run_loader(model: Callable[..., Predictive], loader: Iterable[Batch], *, progress: bool = False,
               description: str = "fxstream.predict") -> tuple[Predictive, torch.Tensor | None]:
    """One pass of ``model`` over ``loader`` in its order: the concatenated Predictive and targets."""
    device = _device(model)
    predictions, targets = [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc=description, disable=not progress, leave=False):
        inputs, y = split_batch(batch)
        if device is not None:
            inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
        predictions.append(model(*inputs))
        if y is not None:
            targets.append(y)
    if not predictions:
        raise FxstreamError("the loader yielded no batches")
    return Predictive.cat(predictions), (torch.cat(targets) if targets else None)


def predict(model: Callable[..., Predictive], loader: Iterable[Batch], *,
            progress: bool = True) -> tuple[Predictive, torch.Tensor | None]:
    """The predictive of every sample ``loader`` yields, and its targets (None when batches have none).

    ``model`` is a :class:`fxstream.StreamlinedModel`; inputs move to its parameters' device. Batches
    are ``(x, y)``, ``(x1, ..., y)`` or bare inputs. On one process the order is the loader's. Under an
    initialised ``torch.distributed`` group of several ranks, the loader's dataset (map-style, at least
    one sample per rank) is sharded contiguously across ranks with the loader's batch size and
    collate function, and every rank returns the whole result in dataset order. A progress bar shows
    batches (rank 0 only).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _predict_sharded(model, loader, progress)
    return run_loader(model, loader, progress=progress)


def _shard(loader: Any, rank: int, world: int) -> torch.utils.data.DataLoader:
    """Rank ``rank``'s contiguous shard of the loader's dataset, batched as the loader batches."""
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, torch.utils.data.DataLoader) or isinstance(dataset, torch.utils.data.IterableDataset) \
            or loader.batch_size is None:
        raise FxstreamError(
            "under torch.distributed, fxstream.predict shards the loader's dataset across ranks, so it needs a "
            "torch DataLoader over a map-style dataset with a batch_size (got "
            f"{type(loader).__name__}); or call it on each rank's own data without a process group"
        )
    n = len(dataset)
    if n < world:
        raise FxstreamError(f"the dataset has {n} samples for {world} ranks; each rank needs at least one")
    start, end = rank * n // world, (rank + 1) * n // world
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(start, end)), batch_size=loader.batch_size,
        collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def _predict_sharded(model: Callable[..., Predictive], loader: Any,
                     progress: bool) -> tuple[Predictive, torch.Tensor | None]:
    rank, world = dist.get_rank(), dist.get_world_size()
    local, targets = run_loader(model, _shard(loader, rank, world), progress=progress and rank == 0)
    device = local.mean.device
    count = torch.tensor([local.mean.shape[0]], device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]

    def gathered(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        on = tensor.to(device)
        padded = on.new_zeros((max(sizes), *on.shape[1:]))
        padded[: on.shape[0]] = on
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]).to(tensor.device)

    joined = Predictive(gathered(local.mean), gathered(local.var), gathered(local.cov), local.likelihood,
                        local.sigma_noise)
    return joined, gathered(targets)
