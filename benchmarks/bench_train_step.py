"""Benchmark: training-step time of DeepViT vs ViT at equal depth (the cost of Re-attention).

    PYTHONPATH=. python benchmarks/bench_train_step.py                     # CPU fp32, 32 blocks, 224 px, batch 8
    PYTHONPATH=. python benchmarks/bench_train_step.py --quick             # 8 blocks, 112 px, batch 4
    PYTHONPATH=. python benchmarks/bench_train_step.py --device cuda --bf16 --compile --batch 64
    PYTHONPATH=. python benchmarks/bench_train_step.py --unfused      # ViT also builds its maps (no fused SDPA)
    PYTHONPATH=. python benchmarks/bench_train_step.py --theta-einsum # Re-attention's Theta as an einsum, not Conv2d
    PYTHONPATH=. python benchmarks/bench_train_step.py --reference-reattn  # Conv2d + BatchNorm2d as written (before)
    # before and after in one interleaved run, 65 tokens (vit_micro: patch 4 at 32 px), 17 tokens with --patch-size 8:
    PYTHONPATH=. python benchmarks/bench_train_step.py --models vit_micro,deepvit_micro:ref,deepvit_micro --batch 64

One step = forward + cross-entropy + backward + AdamW step (timm's ``create_optimizer_v2``, weight decay 0.05, not on
norms/biases), on random images and labels. Both models are built from our presets (``vit_32b`` / ``deepvit_32b``,
or any pair via --models, with --depth / --img-size overriding), in one process, and timed in interleaved rounds:
each round runs --steps steps of every model; the first round is warm-up (and compilation) and is not counted.
Reported: median (min-max) seconds per step over rounds, images/s, and each model's ratio to the first (the baseline).
A model name may carry a suffix selecting the Re-attention implementation: ``:ref`` the reference (Conv2d, norm module,
scale: ``Attention.fast_reattn = False``), ``:torch`` the fast PyTorch path without the Triton kernel
(``triton_reattn = False``), none: the default (fast; Triton on CUDA when importable).
Note: with no probe attached our ViT uses the fused scaled-dot-product attention, while Re-attention has to build the
[B, H, N, N] map, so the ratio includes unfused-vs-fused attention, not only Theta and the BatchNorm.
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

ROOT = Path(__file__).resolve().parents[1]


def einsum_theta(model: torch.nn.Module) -> int:
    """Run each Re-attention head-mixing 1x1 Conv2d as the equivalent einsum over the head axis (same parameters),
    to measure what the convolution kernel costs; returns how many were replaced."""
    count = 0
    for m in model.modules():
        conv = getattr(m, "theta", None)
        if isinstance(conv, torch.nn.Conv2d):
            def forward(x: torch.Tensor, conv: torch.nn.Conv2d = conv) -> torch.Tensor:
                y = torch.einsum("gh,bhij->bgij", conv.weight[:, :, 0, 0], x)  # [B, H, N, N]
                return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)
            conv.forward = forward
            count += 1
    return count


IMPLS = ("", "ref", "torch")


def set_reattn_impl(model: torch.nn.Module, impl: str) -> None:
    """Select the Re-attention implementation ("" default, "ref" reference modules, "torch" no Triton)."""
    if impl not in IMPLS:
        raise SystemExit(f"unknown Re-attention implementation suffix {impl!r}: use one of ':ref', ':torch'")
    for m in model.modules():
        if hasattr(m, "fast_reattn"):
            m.fast_reattn = impl != "ref"
            m.triton_reattn = impl == ""


def build(entry: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    name, _, impl = entry.partition(":")
    overrides = {k: v for k, v in (("depth", args.depth), ("img_size", args.img_size), ("patch_size", args.patch_size))
                 if v is not None}
    model = timm.create_model(name, **overrides).to(args.device).train()
    set_reattn_impl(model, "ref" if args.reference_reattn else impl)
    if args.unfused:  # every attention builds its [B, H, N, N] map, as Re-attention must (same as TIMM_FUSED_ATTN=0)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    if args.theta_einsum:
        einsum_theta(model)
    opt = create_optimizer_v2(model, "adamw", lr=5e-4, weight_decay=0.05)
    if args.compile:
        model = torch.compile(model)
    return model, opt


def step(model, opt, x, y, args) -> None:
    with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_32b,deepvit_32b", help="baseline,candidate")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--patch-size", type=int, default=None, help="tokens = (img / patch)^2 + 1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="steps per model per round")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (plus one warm-up round)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    ap.add_argument("--unfused", action="store_true", help="no fused SDPA anywhere (baseline ViT materialises maps)")
    ap.add_argument("--theta-einsum", action="store_true", help="Re-attention's Theta as an einsum, not a Conv2d")
    ap.add_argument("--reference-reattn", action="store_true",
                    help="every Re-attention as the reference Conv2d + norm module (the code before the fast path)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 is steadier on a machine shared with other work)")
    ap.add_argument("--quick", action="store_true", help="depth 8, 112 px, batch 4, 2 rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_train_step.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.img_size, args.batch, args.rounds = args.depth or 8, args.img_size or 112, 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"collapse_probe from {Path(collapse_probe.__file__).parent}")  # PYTHONPATH=. or an installed copy?
    names = args.models.split(",")
    built = {n: build(n, args) for n in names}
    size = args.img_size or int(built[names[0]][0].default_cfg["input_size"][-1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
    classes = min(int(m.num_classes) for m, _ in built.values())  # micro presets have 10 classes
    y = torch.randint(0, classes, (args.batch,), generator=g).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.rounds + 1):
        for n in names if rnd % 2 == 0 else names[::-1]:  # alternate the order: neither always runs first
            model, opt = built[n]
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, x, y, args)
            sync()
            if rnd > 0:
                times[n].append((time.perf_counter() - t0) / args.steps)
    rows = {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds": len(t),
                "images_per_s": args.batch / statistics.median(t)} for n, t in times.items()}
    base, cand = names[0], names[-1]
    ratio = rows[cand]["median_s"] / rows[base]["median_s"]
    ratios = {n: rows[n]["median_s"] / rows[base]["median_s"] for n in names[1:]}
    tokens = built[base][0].patch_embed.num_patches + getattr(built[base][0], "num_prefix_tokens", 1)
    cfg = (f"depth {args.depth or 'preset'}, {size} px, {tokens} tokens, batch {args.batch}, device {args.device}, "
           f"{'bf16' if args.bf16 else 'fp32'}{', compiled' if args.compile else ''}"
           f"{', unfused attention' if args.unfused or os.environ.get('TIMM_FUSED_ATTN') == '0' else ''}"
           f"{', Theta as einsum' if args.theta_einsum else ''}"
           f"{', reference Re-attention' if args.reference_reattn else ''}, {torch.get_num_threads()} threads, "
           f"{args.steps} steps x "
           f"{args.rounds} rounds, load {os.getloadavg()[0]:.1f}")
    print(f"\ntrain step (forward + backward + AdamW): {cfg}")
    print("| model | s/step median (min-max) | images/s |")
    print("|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['images_per_s']:.1f} |")
    for n, r in ratios.items():
        print(f"| {n} / {base} | {r:.3f} | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": cfg, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "ratio": ratio,
        "ratios": ratios, "tokens": tokens,
        "torch": torch.__version__, "python": platform.python_version(), "collapse_probe": collapse_probe.__file__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}, indent=1))


if __name__ == "__main__":
    main()
