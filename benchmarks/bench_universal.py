"""Benchmark: what the universal capture route (``hooks.universal``) costs, next to a plain forward and the adapters.

    PYTHONPATH=. python benchmarks/bench_universal.py               # CPU, writes results/universal_capture_cpu.json
    PYTHONPATH=. python benchmarks/bench_universal.py --quick       # smoke run
    PYTHONPATH=. python benchmarks/bench_universal.py --device cuda --batch 64 --out results/universal_capture_gpu.json

Models (seeded, random weights), ViT-Ti sized unless --quick (dim 192, 3 heads, depth 12, 224 px / 16 -> 197 tokens):
    softmax   a hand-written ViT: qkv Linear, ``(q @ k^T * scale).softmax(-1)`` (universal route)
    sdpa      the same with ``F.scaled_dot_product_attention`` (universal route: fused call kept, map recomputed)
    timm      timm ``vit_tiny_patch16_224`` (adapter route: ``fused_attn`` off while capturing)
    tiny      the softmax model at dim 32, 16 px / 4 -> 17 tokens, batch 2: Python overhead per op dominates
Modes, each timed as the median of --repeats passes after one warm-up (interleaved), under ``torch.inference_mode``:
    forward        model(x), nothing attached
    mode-only      the tracer's TorchFunctionMode around the forward, no module hooks (the per-op interception cost)
    stack-only     the tracer's module-stack hooks, no mode (the per-module-call cost)
    capture        a forward inside ``capture(model, callback=no-op)`` (kinds=probs; entering the context untimed: a
                   probe enters it once for all its batches): maps computed and delivered
    dry-run        ``universal.discover`` on one image, uncached (paid once per model and input shape)
Reported: seconds per pass (median, min, max; tiny: each sample the mean of 50 passes), each mode's ratio to
``forward`` (medians, and mins: the min is the least disturbed by other load), and the torch-function calls and module
calls of one forward (what the mode and the stack hooks each intercept).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads, sdpa), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int, img: int, patch: int, sdpa: bool) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, sdpa) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 1000)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def _models(quick: bool, device: str) -> dict[str, tuple[nn.Module, int, int]]:
    import timm

    torch.manual_seed(0)
    img, depth = (64, 4) if quick else (224, 12)
    out = {"softmax": (ViT(192, 3, depth, img, 16, False), img, 0),
           "sdpa": (ViT(192, 3, depth, img, 16, True), img, 0),
           "timm": (timm.create_model("vit_tiny_patch16_224", img_size=img, depth=depth), img, 0),
           "tiny": (ViT(32, 4, depth, 16, 4, False), 16, 2)}
    return {k: (m.to(device).eval(), s, b) for k, (m, s, b) in out.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(run, device: str, enter=None, inner: int = 1) -> float:
    """Seconds per ``run()``, averaged over ``inner`` runs; ``enter()`` (untimed) returns a context to run them in."""
    import contextlib

    with enter() if enter is not None else contextlib.nullcontext():
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            run()
        _sync(device)
        return (time.perf_counter() - t0) / inner


def _counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Torch-function calls and module calls in one forward: what the mode and the stack hooks each intercept."""
    calls = {"torch_function_calls": 0, "module_calls": 0}

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls["torch_function_calls"] += 1
            return func(*args, **(kwargs or {}))

    handles = [m.register_forward_pre_hook(lambda *_: calls.__setitem__("module_calls", calls["module_calls"] + 1))
               for m in model.modules()]
    with Count():
        model(x)
    for h in handles:
        h.remove()
    return calls


def _modes(model: nn.Module, x: torch.Tensor, universal: bool, device: str, inner: int) -> dict:
    """mode -> a function timing one pass of it (seconds)."""
    from collapse_probe.hooks import universal as uni
    from collapse_probe.hooks.capture import capture
    from collapse_probe.hooks.tracer import Tracer, _Mode

    class Quiet:  # a handler that wants nothing: the tracer's bare cost
        def reset(self) -> None: ...
        def wants(self, call) -> bool: return False
        def seen(self, call, probs): return None

    class NoMode:  # stands in for the tracer's mode: entered and left, intercepts nothing
        def __enter__(self) -> None: ...
        def __exit__(self, *exc) -> None: ...

    def forward():
        model(x)

    def stack_hooks():
        import contextlib

        @contextlib.contextmanager
        def ctx():
            tracer = Tracer(model, Quiet())
            tracer.mode = NoMode()
            remove = tracer.install()
            try:
                yield
            finally:
                remove()
        return ctx()

    def dry_run():
        uni._CACHE.pop(model, None)
        uni.discover(model, x)

    modes = {"forward": lambda: _timed(forward, device, inner=inner),
             "capture": lambda: _timed(forward, device, lambda: capture(model, callback=lambda s, t: None, example=x),
                                       inner)}
    if universal:
        modes.update({"mode-only": lambda: _timed(forward, device, lambda: _Mode(Tracer(model, Quiet())), inner),
                      "stack-only": lambda: _timed(forward, device, stack_hooks, inner),
                      "dry-run": lambda: _timed(dry_run, device, inner=inner)})
    return modes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with torch.inference_mode():
        for name, (model, img, batch) in _models(args.quick, args.device).items():
            x = torch.randn(batch or args.batch, 3, img, img, device=args.device)
            inner = 50 if name == "tiny" else 1  # a few ms per pass: average many, so timer and scheduler noise fade
            modes = _modes(model, x, name != "timm", args.device, inner)
            counts = _counts(model, x)
            order = list(modes)
            times: dict[str, list[float]] = {m: [] for m in order}
            for m in order:  # warm-up
                modes[m]()
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits every mode alike
                for m in order:
                    times[m].append(modes[m]())
            base = statistics.median(times["forward"])
            for m in order:
                med = statistics.median(times[m])
                rows.append({"model": name, "mode": m, "batch": int(x.shape[0]), "tokens": (img // (4 if name == "tiny"
                             else 16)) ** 2 + 1, "median_s": med, "min_s": min(times[m]), "max_s": max(times[m]),
                             "ratio_to_forward": med / base, "ratio_min_to_min": min(times[m]) / min(times["forward"]),
                             "inner": inner, **counts})
                print(f"{name:8s} {m:11s} {med * 1e3:9.2f} ms  x{med / base:5.2f}  min x"
                      f"{min(times[m]) / min(times['forward']):5.2f}", flush=True)
    out = Path(args.out) if args.out else ROOT / "results" / f"universal_capture_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "repeats": args.repeats, "quick": args.quick}
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
