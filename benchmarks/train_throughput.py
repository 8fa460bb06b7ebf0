"""Training throughput (images/s) of ViT vs DeepViT: forward + backward + AdamW step on random data, one device.

    python benchmarks/train_throughput.py                                  # vit_32b, deepvit_32b; bf16 on CUDA
    python benchmarks/train_throughput.py --compile --batch-size 64       # also torch.compile
    python benchmarks/train_throughput.py --models vit_micro deepvit_micro --device cpu --amp none --batch-size 32

Measures the same step as the trainer (autocast, AdamW with timm's parameter groups), after warm-up steps (which include
compilation), with the device synchronised around the timed loop. Prints one line per model, as a Markdown table.
"""
from __future__ import annotations

import argparse
import time

import torch

from collapse_probe.loading.build import create_model


def measure(name: str, batch_size: int, steps: int, warmup: int, device: torch.device, amp: str, compile_: bool,
            drop_path: float = 0.2) -> dict:
    from timm.optim import create_optimizer_v2

    model = create_model(name, drop_path_rate=drop_path).to(device).train()
    opt = create_optimizer_v2(model, opt="adamw", lr=5e-4, weight_decay=0.05)
    fwd = torch.compile(model) if compile_ else model
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(batch_size, *size, device=device)
    y = torch.randint(0, model.num_classes, (batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"model": name, "images_per_s": batch_size * steps / dt, "step_ms": 1000 * dt / steps, "peak_gib": mem}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_32b", "deepvit_32b"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    device = torch.device(a.device)
    amp = a.amp or ("bf16" if device.type == "cuda" else "none")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), amp {amp}, "
          f"compile {a.compile}, batch {a.batch_size}")
    print("| model | images/s | ms/step | peak GiB |\n|---|---|---|---|")
    for name in a.models:
        r = measure(name, a.batch_size, a.steps, a.warmup, device, amp, a.compile)
        print(f"| {r['model']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
