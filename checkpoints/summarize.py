"""Rewrite checkpoints/summary.csv from the metadata of checkpoints/*_d*.safetensors (no model is run).

    python checkpoints/summarize.py [FOLDER]       # default: this folder; prints the table as Markdown too
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from safetensors import safe_open

HERE = Path(__file__).resolve().parent
FIELDS = ["name", "architecture", "depth", "params", "top1", "top5", "weights", "epochs", "similar_blocks",
          "similar_ratio", "similar_blocks_probs", "map_kind"]


def rows(folder: Path = HERE) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*_d*.safetensors")):
        m = re.fullmatch(r"(.+)_d(\d+)", path.stem)
        if not m:
            continue
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["collapse_probe"])
            params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()
                         if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        ev, col = meta.get("eval", {}), meta.get("collapse", {})
        out.append({"name": path.stem, "architecture": meta["architecture"], "depth": int(m.group(2)),
                    "params": params, "top1": round(ev.get("top1", float("nan")), 2),
                    "top5": round(ev.get("top5", float("nan")), 2), "weights": ev.get("weights", ""),
                    "epochs": ev.get("epochs", ""), "similar_blocks": col.get("similar_blocks", ""),
                    "similar_ratio": round(col.get("similar_ratio", float("nan")), 3),
                    "similar_blocks_probs": col.get("similar_blocks_probs", ""), "map_kind": col.get("kind", "")})
    return sorted(out, key=lambda r: (r["architecture"] != "vit_micro", r["depth"]))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    table = rows(folder)
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(table)
    print("| model | depth | params | top-1 % | top-5 % | weights | similar blocks | similar blocks (softmax maps) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['architecture']} | {r['depth']} | {r['params']:,} | {r['top1']} | {r['top5']} | {r['weights']} | "
              f"{r['similar_blocks']} / {r['depth']} | {r['similar_blocks_probs']} |")


if __name__ == "__main__":
    main()
