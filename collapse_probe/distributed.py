"""torchrun processes: joining the process group, this process's device, and sharded probing.

    torchrun --nproc-per-node 2 -m collapse_probe similarity ckpt.safetensors --format json -o out.json
    torchrun --nproc-per-node 8 -m collapse_probe train --preset paper --data-dir /data/imagenet

Without torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE) everything runs in one process (rank 0 of 1).

Rank r takes images r, r + W, r + 2W, ... (like ``DistributedSampler`` with ``shuffle=False`` but without the padding
duplicates, which would count some images twice and bias the means). Every accumulator holds sums and counts, so the
all-reduced state equals the single-process state up to float rounding; per-image rows (for bootstrap intervals) are
not summable and are gathered instead, back into image order. Only rank 0 writes output.
Backend: NCCL on CUDA, gloo on the CPU. The trainer (``collapse_probe.train``) uses the same setup.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from .errors import BadArgumentError


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the torchrun environment; (0, 0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """"auto" picks CUDA when available, else the CPU; a bare "cuda" becomes cuda:``local_rank`` when one is given."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadArgumentError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: nothing to compute maps with
        raise BadArgumentError(f"device '{device}' cannot run a probe; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadArgumentError(f"device '{device}' requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadArgumentError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str | None = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (once); pick this process's device (cuda:LOCAL_RANK)."""
    rank, local_rank, world = env_world()
    dev = resolve_device(device, local_rank if world > 1 else None)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 and outside torchrun: the process that prints and writes files."""
    return not active() or dist.get_rank() == 0


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Indices of ``n`` items for ``rank``: strided, no padding, so the shards partition range(n) exactly."""
    return list(range(rank, n, world))


def shard_count(n: int, rank: int, world: int) -> int:
    """How many of the first ``n`` items rank ``rank`` holds under ``shard_indices`` (e.g. its share of a cap)."""
    return len(range(rank, n, world))


def shard_loader(loader: DataLoader) -> DataLoader:
    """The same loader over this rank's shard of ``loader.dataset`` (unchanged when not distributed)."""
    if not active():
        return loader
    rank, world = dist.get_rank(), dist.get_world_size()
    subset = Subset(loader.dataset, shard_indices(len(loader.dataset), rank, world))
    return DataLoader(subset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers)


def all_reduce_sums(accumulators: Sequence, device: torch.device) -> None:
    """Sum every accumulator's ``state()`` over the ranks (one flat float64 all-reduce) and load it back; gather the
    per-image rows of those that keep them (``per_image_state`` / ``load_per_image``) with ``gather_images``."""
    if not active():
        return
    states = [acc.state() for acc in accumulators]
    flat = torch.cat([t.reshape(-1).to(torch.float64) for st in states for t in st.values()])
    flat = flat.to(_comm_device(device))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat, offset = flat.cpu(), 0
    for acc, st in zip(accumulators, states):
        new = {}
        for name, t in st.items():
            new[name] = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()
        acc.load_state(new)
    for acc in accumulators:  # the same accumulators in the same order on every rank: the collectives pair up
        if hasattr(acc, "per_image_state"):
            rows = acc.per_image_state()
            if rows:
                whole = gather_images(torch.cat([t.reshape(t.shape[0], -1) for t in rows.values()], 1), device)
                parts = whole.split([math.prod(t.shape[1:]) for t in rows.values()], 1)
                acc.load_per_image({n: p.reshape(-1, *t.shape[1:]) for (n, t), p in zip(rows.items(), parts)})


def _comm_device(device: torch.device) -> torch.device | str:
    return device if dist.get_backend() == "nccl" else "cpu"


def gather_images(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """This rank's per-image rows [n_r, K] -> every rank's, [sum n_r, K], in global image order.

    Ranks hold different numbers of images, so each pads to the largest count for ``all_gather``. With the strided
    shards of ``shard_indices`` (rank r holds images r, r + W, ...) image g is row g // W of rank g % W, which restores
    the single-process order; counts that do not fit that pattern are concatenated in rank order.
    """
    world, dev = dist.get_world_size(), _comm_device(device)
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    if max(counts) == 0:
        return rows.cpu()
    padded = torch.zeros(max(counts), rows.shape[1], dtype=rows.dtype, device=dev)
    padded[:rows.shape[0]] = rows.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:c].cpu() for p, c in zip(parts, counts)]
    total = sum(counts)
    if counts != [shard_count(total, r, world) for r in range(world)]:
        return torch.cat(parts)
    out = torch.empty(total, rows.shape[1], dtype=rows.dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks (on a copy); a no-op in one process."""
    if not info.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
