"""Benchmark: the verdict's intervention measurement (probing.redundancy.measure_redundancy) with and without the
prefix cache (an intervention's forward starts at its first touched block; earlier blocks' outputs are replayed from
the unmodified forward of the same batch).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_redundancy.py                  # both bundled 32-block models
    PYTHONPATH=. python benchmarks/bench_redundancy.py --checkpoints checkpoints/vit_micro_d8.safetensors --repeats 1

Both modes run in this one process, interleaved over repeats (cache, full, cache, full, ...) so that a change in the
machine's load hits both; reported: wall seconds per run, the median ratio full / cache, and whether both modes gave
the same redundant blocks and the same changed counts (they must: the cache is exact). Writes --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", nargs="+", default=[str(ROOT / "checkpoints" / "vit_micro_d32.safetensors"),
                                                        str(ROOT / "checkpoints" / "deepvit_micro_d32.safetensors")])
    ap.add_argument("--images", default="builtin:digits")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "redundancy_prefix_cache_cpu.json"))
    args = ap.parse_args()
    from collapse_probe.loading.build import load_model
    from collapse_probe.probing.redundancy import measure_redundancy

    results = []
    for path in args.checkpoints:
        loaded = load_model(path)
        runs: dict[str, list[float]] = {"cache": [], "full": []}
        found: dict[str, tuple] = {}
        for _ in range(args.repeats):
            for mode in ("cache", "full"):
                start = time.perf_counter()
                red = measure_redundancy(loaded, args.images, batch_size=args.batch_size, progress=False,
                                         prefix_cache=mode == "cache")
                runs[mode].append(time.perf_counter() - start)
                found[mode] = (tuple(red["blocks"]), tuple(r["changed_count"] for r in red["per_block"]),
                               tuple(red["removable"] or ()))
        med = {m: statistics.median(v) for m, v in runs.items()}
        results.append({"checkpoint": Path(path).name, "wall_s": runs, "median_s": med,
                        "ratio_full_over_cache": med["full"] / med["cache"],
                        "same_numbers": found["cache"] == found["full"], "redundant_blocks": list(found["cache"][0])})
        print(f"{Path(path).name}: cache {med['cache']:.1f} s, full {med['full']:.1f} s, "
              f"x{med['full'] / med['cache']:.2f}, same numbers: {found['cache'] == found['full']}", flush=True)
    out = {"benchmark": "bench_redundancy", "args": vars(args), "torch": torch.__version__, "machine":
           platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
           "load_avg_after": os.getloadavg()[0], "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
