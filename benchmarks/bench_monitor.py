"""Benchmark: what ``CollapseMonitor`` costs a training run at its default frequency.

    PYTHONPATH=. python benchmarks/bench_monitor.py                        # vit_micro depth 8, batch 64, 300 steps x 3
    PYTHONPATH=. python benchmarks/bench_monitor.py --steps 100 --repeats 1 --every 25      # quick look
    PYTHONPATH=. python benchmarks/bench_monitor.py --model vit_tiny_patch16_224 --img-size 32 --patch-size 4

One run = ``--steps`` training steps (forward, cross-entropy, backward, AdamW step; timm's ``create_optimizer_v2``) of a
freshly built model on fixed random images, after 5 untimed warm-up steps; a "monitor" run also calls
``monitor.maybe_measure(model, step)`` after every step (``builtin:digits``, 16 images, the monitor's defaults).
Plain and monitor runs alternate (ABBA order over ``--repeats``) in one process, so a machine whose load drifts
disturbs both alike. The probe images are read once before timing (a one-time cost, reported apart as
``first_read_s``).

Reported (benchmarks/results/monitor.json): wall and CPU (process) seconds of every run; the monitor / plain ratio of
the medians and of each adjacent pair; and, less sensitive to other users of the machine, the overhead implied by the
parts: seconds per measurement (the monitor's own clock) / (every x seconds per plain step), also for other ``every``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.probing.monitor import DEFAULT_EVERY, DEFAULT_IMAGES, CollapseMonitor

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5
OTHER_EVERY = (10, 25, 50, 100, 200, 500, 1000)


def build(args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    kw = {k: v for k, v in (("depth", args.depth), ("img_size", args.img_size), ("patch_size", args.patch_size))
          if v is not None}
    model = timm.create_model(args.model, num_classes=10, **kw).train()
    return model, create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)


def run(args, data: tuple[torch.Tensor, torch.Tensor], monitor: CollapseMonitor | None) -> dict:
    model, opt = build(args)
    x, y = data

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARMUP):
        step()
    first_read = None
    if monitor is not None:
        t = time.perf_counter()
        monitor.probe_batch(model)
        first_read = time.perf_counter() - t
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        step()
        if monitor is not None:
            monitor.maybe_measure(model, i + 1)
    out = {"mode": "monitor" if monitor else "plain", "wall_s": time.perf_counter() - wall,
           "cpu_s": time.process_time() - cpu, "load_avg_after": os.getloadavg()[0]}
    if monitor is not None:
        v = monitor.verdicts
        out.update(measurements=len(v), measure_s=[round(s, 4) for s in v.seconds], first_read_s=first_read,
                   similar_blocks_last=int(v["count"].iloc[-1]) if len(v) else None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_micro")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=DEFAULT_EVERY)
    p.add_argument("--images", default="builtin:digits")
    p.add_argument("--num-images", type=int, default=DEFAULT_IMAGES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "monitor.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    size = args.img_size or 32
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(args.batch, 3, size, size, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
    runs = []
    for r in range(args.repeats):
        for mode in (("plain", "monitor") if r % 2 == 0 else ("monitor", "plain")):  # ABBA
            mon = CollapseMonitor(args.images, every=args.every, num_images=args.num_images) if mode == "monitor" \
                else None
            runs.append(run(args, data, mon))
            print(json.dumps(runs[-1]), flush=True)
    plain = [r for r in runs if r["mode"] == "plain"]
    moni = [r for r in runs if r["mode"] == "monitor"]
    med = {k: {m: statistics.median(r[k] for r in rs) for m, rs in (("plain", plain), ("monitor", moni))}
           for k in ("wall_s", "cpu_s")}
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    pair_ratio = [round((b if b["mode"] == "monitor" else a)["wall_s"] / (a if a["mode"] == "plain" else b)["wall_s"],
                        4) for a, b in pairs]
    step_s = med["wall_s"]["plain"] / args.steps
    measure_s = statistics.median(s for r in moni for s in r["measure_s"])
    summary = {
        "ratio_wall_medians": med["wall_s"]["monitor"] / med["wall_s"]["plain"],
        "ratio_cpu_medians": med["cpu_s"]["monitor"] / med["cpu_s"]["plain"],
        "ratio_wall_pairs": pair_ratio,
        "plain_step_s": step_s, "measure_s_median": measure_s,
        "measure_in_steps": measure_s / step_s,
        "implied_overhead": {str(e): measure_s / (e * step_s) for e in sorted({*OTHER_EVERY, args.every})},
        "first_read_s": statistics.median(r["first_read_s"] for r in moni),
    }
    result = {"benchmark": "bench_monitor", "args": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
              "torch": torch.__version__, "timm": timm.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
