"""GPU check and micro-benchmark of the Re-attention implementations on one [B, H, N, N] map (forward + backward).

    PYTHONPATH=. python benchmarks/bench_reattention_gpu.py                       # B 64, H 12, N 197, bf16 autocast
    PYTHONPATH=. python benchmarks/bench_reattention_gpu.py --batch 8 --tokens 65 --fp32

First a parity check on the device (compiled Triton kernel, not the interpreter the CPU tests use): output, dA and
the Theta / BN gradients of ``reattention_triton`` and ``reattention_fast`` against ``reattention_reference``, BN in
train and eval mode; then the time of softmax map -> Norm(Theta A) * scale -> @ V, forward and backward, for each
implementation (median of --repeats). Writes JSON to --out. Exits 1 if a parity check fails.
CPU smoke run (the kernel through Triton's interpreter, tiny sizes):

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_reattention_gpu.py --device cpu --batch 2 --tokens 17 \\
        --heads 4 --repeats 2 --out /tmp/reattention_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from collapse_probe.models.reattention import reattention_fast, reattention_reference
from collapse_probe.models.reattention_triton import reattention_triton

ROOT = Path(__file__).resolve().parents[1]
IMPLS = {"reference": reattention_reference, "torch": reattention_fast, "triton": reattention_triton}


def modules(heads: int, train: bool, device: str) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    theta, bn = nn.Conv2d(heads, heads, 1).to(device), nn.BatchNorm2d(heads).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 1.5)
    return theta, bn.train(train)


def run_once(impl: str, logits: torch.Tensor, v: torch.Tensor, theta: nn.Conv2d, bn: nn.Module, bf16: bool):
    """softmax -> Re-attention -> @ V, backward of a fixed projection; returns (out, dlogits, dtheta, dbn)."""
    logits = logits.detach().requires_grad_(True)
    with torch.autocast(logits.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = IMPLS[impl](logits.softmax(-1), theta, bn, 1.0) @ v
    out.float().square().mean().backward()
    return out.detach().float(), logits.grad, theta.weight.grad, bn.weight.grad


def rel_err(got: tuple[torch.Tensor, ...], exact: tuple[torch.Tensor, ...]) -> float:
    """Largest relative (Frobenius) error over output, dlogits, dTheta, dBN weight."""
    return max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(got, exact))


def parity(args) -> dict[str, float]:
    """Each implementation's error against the fp32 reference; in bf16 the reference's own bf16 error is reported too
    (``reference_*_bf16``), since bf16 rounding of the map and of its gradients dominates."""
    B, H, N, D = 4, args.heads, args.tokens, 32
    errs = {}
    for train in (True, False):
        g = torch.Generator(device=args.device).manual_seed(1)
        logits = torch.randn(B, H, N, N, device=args.device, generator=g) * 2
        v = torch.randn(B, H, N, D, device=args.device, generator=g)
        base = modules(H, train, args.device)
        exact = run_once("reference", logits, v, *copy.deepcopy(base), False)
        for bf16 in (False, True):
            for impl in ("reference", "torch", "triton") if bf16 else ("torch", "triton"):
                key = f"{impl}_{'train' if train else 'eval'}_{'bf16' if bf16 else 'fp32'}"
                errs[key] = rel_err(run_once(impl, logits, v, *copy.deepcopy(base), bf16), exact)
    return errs


def parity_failures(errs: dict[str, float]) -> dict[str, float]:
    """fp32: rounding only (1e-4); bf16: no worse than twice the reference's own bf16 error, plus 1e-3."""
    bad = {}
    for key, e in errs.items():
        if key.startswith("reference"):
            continue
        limit = 1e-4 if key.endswith("fp32") else 2 * errs["reference" + key[key.index("_"):]] + 1e-3
        if e > limit:
            bad[key] = e
    return bad


def timing(args) -> dict[str, dict[str, float]]:
    B, H, N, D = args.batch, args.heads, args.tokens, 32
    logits = torch.randn(B, H, N, N, device=args.device)
    v = torch.randn(B, H, N, D, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = {}
    for impl in IMPLS:
        theta, bn = modules(H, True, args.device)
        for _ in range(3):
            run_once(impl, logits, v, theta, bn, not args.fp32)
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            run_once(impl, logits, v, theta, bn, not args.fp32)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        rows[impl] = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}
        print(f"{impl:>9}: {rows[impl]['median_ms']:.3f} ms ({rows[impl]['min_ms']:.3f}-{rows[impl]['max_ms']:.3f})")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast in the timing")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reattention_gpu.json")
    args = ap.parse_args(argv)
    errs = parity(args)
    for k, e in errs.items():
        print(f"parity {k}: max relative error {e:.2e}")
    rows = timing(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "parity": errs, "rows": rows,
                                    "device": device, "torch": torch.__version__}, indent=1))
    bad = parity_failures(errs)
    if bad:
        raise SystemExit(f"parity failed: {bad}")


if __name__ == "__main__":
    main()
