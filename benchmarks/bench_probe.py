"""Benchmark: streaming probe vs plain forward vs a naive extract-everything baseline.

    PYTHONPATH=. python benchmarks/bench_probe.py                       # README table: 128 images, both models
    PYTHONPATH=. python benchmarks/bench_probe.py --quick               # ~1 min smoke run (micro models, 16 images)
    PYTHONPATH=. python benchmarks/bench_probe.py --models vit_small_patch16_224 --images 64 --repeats 2
    PYTHONPATH=. python benchmarks/bench_probe.py --device cuda --images 512

Modes, each timed in its own child process (so peak RSS belongs to that mode alone), interleaved over repeats:
    forward  (a) the model's plain forward (timm's fused attention where the model has it)
    unfused  (a') the same forward with fused attention switched off: the floor of any probe, which must build the maps
    probe    (b) collapse_probe.probe: full L x L cross-layer similarity + ratio, similar blocks, cross-head similarity,
                 attention ranks on the first --rank-images images; maps streamed block by block
    norank   (b without ranks) the same probe with rank_images=0, to show what the SVDs cost
    naive    (c) timm's AttentionExtract (fused attention off) keeping every map of every image, stacked to
                 [L, images, H, N, N], then the same metrics from collapse_probe.metrics.functional
    probe2x  (b) over twice the images: its peak memory should not grow (streaming)
Each child builds the model (seeded), preprocesses scikit-image's sample photographs once (timm eval transform) and
feeds batches cycled from them, runs one warm-up batch, then times the whole pass. Reported: median / min / max
seconds over repeats, images/s, peak RSS (ru_maxrss of the child; CUDA: max_memory_allocated) and the child's RSS
before the work (model + images), ratios b/a and c/b, peak(c)/peak(b). Writes a JSON file (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("forward", "unfused", "probe", "norank", "naive", "probe2x")


# ----------------------------------------------------------------------------------------------------------- child


def _photo_pool(model):
    """The 17 sample photographs preprocessed with the model's timm eval transform: [17, 3, H, W] (built untimed)."""
    import torch
    from timm.data import create_transform, resolve_model_data_config

    from collapse_probe.loading.images import sample_photographs

    tf = create_transform(**resolve_model_data_config(model), is_training=False)
    return torch.stack([tf(img) for _, img in sample_photographs()])


def _batches(pool, n_images: int, batch: int):
    """Yield [B, 3, H, W] batches cycled from the pool (a different mix and shift per batch)."""
    import torch

    for start in range(0, n_images, batch):
        idx = (torch.arange(start, min(start + batch, n_images)) * 7) % len(pool)
        yield torch.roll(pool[idx], shifts=start % 13, dims=-1)


def _naive(model, batches, kinds, rank_images: int, device):
    """Baseline (c): extract every map with timm's AttentionExtract, stack them all, then compute the metrics."""
    import torch
    from timm.layers import Attention as TimmAttention
    from timm.utils import AttentionExtract

    from collapse_probe.metrics import functional as MF

    for m in model.modules():
        if isinstance(m, TimmAttention):
            m.fused_attn = False
    ours = any(n.endswith("attn.probs") for n, _ in model.named_modules())
    names = {"probs": "*attn.probs" if ours else "*attn.attn_drop", "mixed": "*attn.mixed"}
    extract = AttentionExtract(model, names=[names[k] for k in kinds], method="hook")
    per_name: dict[str, list] = {}
    for x in batches:
        out = extract(x.to(device))
        for name, t in out.items():
            per_name.setdefault(name, []).append(t)
    results = {}
    for kind in kinds:
        key = names[kind].lstrip("*")
        maps = torch.stack([torch.cat(v) for n, v in per_name.items() if n.endswith(key)])  # [L, images, H, N, N]
        per_name = {n: v for n, v in per_name.items() if not n.endswith(key)}
        S, R = MF.cross_layer_similarity(maps)
        results[kind] = dict(
            similar=MF.similar_blocks(S, 0.9), ratio=R,
            cross_head=[MF.cross_head_similarity(a) for a in maps],
            ranks=[MF.singular_value_ranks(a[:rank_images]) for a in maps] if rank_images else None,
        )
        del maps
    return results


def child(args) -> dict:
    import timm
    import torch

    import collapse_probe.models  # noqa: F401  (registers our models with timm)
    from collapse_probe.probing.run import probe

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    n = args.images * (2 if args.mode == "probe2x" else 1)
    kinds = tuple(k for k in args.kinds.split(",") if k != "mixed" or "deepvit" in args.model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pool = _photo_pool(model)
    if args.mode == "unfused":
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False

    def work(count: int):
        batches = _batches(pool, count, args.batch)
        if args.mode in ("forward", "unfused"):
            with torch.inference_mode():
                for x in batches:
                    model(x.to(device))
        elif args.mode in ("probe", "norank", "probe2x"):
            probe(model, batches, kinds=kinds, device=device, progress=False,
                  rank_images=0 if args.mode == "norank" else args.rank_images,
                  storage=args.storage, max_memory=args.max_memory, baseline=False)
        else:
            with torch.inference_mode():
                _naive(model, batches, tuple(k for k in kinds if k != "out"), args.rank_images, device)
        sync()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    work(min(args.batch, n))  # warm-up: one batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    work(n)
    seconds = time.perf_counter() - t0
    out = {"mode": args.mode, "model": args.model, "images": n, "seconds": seconds, "images_per_s": n / seconds,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before": rss_before,
           "kinds": list(kinds), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


# ---------------------------------------------------------------------------------------------------------- parent


def _run_child(mode: str, model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", model, "--images", str(args.images),
           "--batch", str(args.batch), "--rank-images", str(args.rank_images), "--storage", args.storage,
           "--device", args.device, "--kinds", args.kinds] + (["--max-memory", args.max_memory] if args.max_memory
                                                              else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if p.returncode != 0:
        return {"mode": mode, "model": model, "error": (p.stderr.strip().splitlines() or ["?"])[-1],
                "returncode": p.returncode}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def summarise(runs: list[dict], models: list[str], modes: list[str]) -> dict:
    table = {}
    for model in models:
        rows = {}
        for mode in modes:
            ok = [r for r in runs if r["model"] == model and r["mode"] == mode and "error" not in r]
            bad = [r for r in runs if r["model"] == model and r["mode"] == mode and "error" in r]
            if not ok:
                rows[mode] = {"error": bad[0]["error"] if bad else "not run"}
                continue
            secs = [r["seconds"] for r in ok]
            rows[mode] = {
                "images": ok[0]["images"], "median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
                "repeats": len(ok), "images_per_s": ok[0]["images"] / statistics.median(secs),
                "peak_rss": max(r["peak_rss"] for r in ok), "rss_before": min(r["rss_before"] for r in ok),
                **({"peak_cuda": max(r["peak_cuda"] for r in ok)} if "peak_cuda" in ok[0] else {}),
            }
        ratios = {}
        t = {m: rows[m].get("median_s") for m in rows}
        if t.get("forward") and t.get("probe"):
            ratios["b/a"] = t["probe"] / t["forward"]
        if t.get("forward") and t.get("unfused"):
            ratios["floor a'/a"] = t["unfused"] / t["forward"]
        if t.get("unfused") and t.get("probe"):
            ratios["b/a'"] = t["probe"] / t["unfused"]
        if t.get("forward") and t.get("norank"):
            ratios["b_norank/a"] = t["norank"] / t["forward"]
        if t.get("probe") and t.get("naive"):
            ratios["c/b"] = t["naive"] / t["probe"]
            mem = "peak_cuda" if "peak_cuda" in rows["probe"] else "peak_rss"
            ratios["peak(c)/peak(b)"] = rows["naive"][mem] / rows["probe"][mem]
            if mem == "peak_rss":
                grow = {m: rows[m]["peak_rss"] - rows[m]["rss_before"] for m in ("probe", "naive")}
                ratios["growth(c)/growth(b)"] = grow["naive"] / max(grow["probe"], 1)
        if rows.get("probe2x", {}).get("peak_rss") and rows.get("probe", {}).get("peak_rss"):
            key = "peak_cuda" if "peak_cuda" in rows["probe"] else "peak_rss"
            ratios["peak(2x images)/peak(b)"] = rows["probe2x"][key] / rows["probe"][key]
        table[model] = {"modes": rows, "ratios": ratios}
    return table


def print_table(summary: dict, args) -> None:
    mem_key = "peak_cuda" if args.device.startswith("cuda") else "peak_rss"
    print(f"\n{args.images} images at the model's input size, batch {args.batch}, device {args.device}, "
          f"rank on first {args.rank_images} images, storage {args.storage}, kinds {args.kinds}")
    peak = "GPU" if mem_key == "peak_cuda" else "RSS"
    print(f"| model | mode | images | median s (min-max) | images/s | peak {peak} GiB | RSS before GiB |")
    print("|---|---|---|---|---|---|---|")
    for model, s in summary.items():
        for mode, r in s["modes"].items():
            if "error" in r:
                print(f"| {model} | {mode} | - | {r['error'][:60]} | - | - | - |")
                continue
            print(f"| {model} | {mode} | {r['images']} | {r['median_s']:.1f} ({r['min_s']:.1f}-{r['max_s']:.1f}) | "
                  f"{r['images_per_s']:.2f} | {_gib(r[mem_key])} | {_gib(r['rss_before'])} |")
        print(f"| {model} | ratios | " + ", ".join(f"{k} = {v:.2f}" for k, v in s["ratios"].items()) + " | | | | |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_small_patch16_224,deepvit_32b")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank-images", type=int, default=8)
    ap.add_argument("--storage", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--kinds", default="probs", help="map kinds for (b) and (c): probs[,mixed][,out] (out: b only)")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="micro models, 16 images, 1 repeat")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_probe.json")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.models, args.images, args.repeats, args.batch = "vit_micro,deepvit_micro", 16, 1, 8
    models, modes = args.models.split(","), args.modes.split(",")
    runs, load_before = [], os.getloadavg()
    for rep in range(args.repeats):
        for model in models:
            for mode in modes:
                if mode == "probe2x" and rep > 0:
                    continue  # memory only: one run
                r = _run_child(mode, model, args)
                runs.append(r)
                msg = r.get("error") or f"{r['seconds']:.1f}s, peak RSS {_gib(r['peak_rss'])} GiB"
                print(f"[{rep + 1}/{args.repeats}] {model} {mode}: {msg}", file=sys.stderr, flush=True)
    summary = summarise(runs, models, modes)
    print_table(summary, args)
    import torch

    info = {"args": {k: str(v) for k, v in vars(args).items()}, "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_before": load_before, "load_after": os.getloadavg(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
