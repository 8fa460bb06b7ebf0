"""torchrun processes: joining the process group, this process's device, and sharded probing.

    torchrun --nproc-per-node 2 -m collapse_probe similarity ckpt.safetensors --format json -o out.json
    torchrun --nproc-per-node 8 -m collapse_probe train --preset paper --data-dir /data/imagenet

Without torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE) everything runs in one process (rank 0 of 1).

Rank r takes images r, r + W, r + 2W, ... (like ``DistributedSampler`` with ``shuffle=False`` but without the padding
duplicates, which would count some images twice and bias the means). Every accumulator holds sums and counts, so the
all-reduced state equals the single-process state up to float rounding; only rank 0 writes output.
Backend: NCCL on CUDA, gloo on the CPU. The trainer (``collapse_probe.train``) uses the same setup.
"""
from __future__ import annotations

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
    """Sum every accumulator's ``state()`` over the ranks (one flat float64 all-reduce) and load it back."""
    if not active():
        return
    states = [acc.state() for acc in accumulators]
    flat = torch.cat([t.reshape(-1).to(torch.float64) for st in states for t in st.values()])
    flat = flat.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat, offset = flat.cpu(), 0
    for acc, st in zip(accumulators, states):
        new = {}
        for name, t in st.items():
            new[name] = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()
        acc.load_state(new)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks (on a copy); a no-op in one process."""
    if not info.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
