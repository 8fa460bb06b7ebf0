"""Distributed probing with torchrun: each rank probes a shard of the images, the accumulators are all-reduced.

    torchrun --nproc-per-node 2 -m collapse_probe similarity ckpt.safetensors --format json -o out.json

Rank r takes images r, r + W, r + 2W, ... (like ``DistributedSampler`` with ``shuffle=False`` but without the padding
duplicates, which would count some images twice and bias the means). Every accumulator holds sums and counts, so the
all-reduced state equals the single-process state up to float rounding; only rank 0 writes output.
Backend: NCCL when the probe runs on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the torchrun environment; (0, 0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> bool:
    """Join the torchrun process group (once); False when running as a single process."""
    if env_world()[2] <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


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
