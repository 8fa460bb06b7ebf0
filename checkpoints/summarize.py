"""Rewrite checkpoints/summary.csv from the metadata of checkpoints/*_d*.safetensors (no model is run), and the README's
digits table from that metadata plus figures/digits/summary.csv (what `collapse-probe figures` measured).

    python checkpoints/summarize.py [FOLDER]       # default: this folder; prints the table as Markdown too
    python checkpoints/summarize.py --readme       # rewrite the README block between the digits-table markers

tests/test_checkpoints.py checks that the README's block is exactly what ``readme_table()`` gives, so every number in
it comes from the committed files.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from safetensors import safe_open

from collapse_probe.metrics.bootstrap import wilson

HERE = Path(__file__).resolve().parent
FIELDS = ["name", "architecture", "depth", "seed", "params", "top1", "top5", "weights", "epochs", "similar_blocks",
          "similar_ratio", "similar_blocks_probs", "map_kind"]
NAME = re.compile(r"(.+)_d(\d+)(?:_s(\d+))?")  # vit_micro_d16, vit_micro_d16_s1 (seed 1; no suffix: seed 42)


def rows(folder: Path = HERE) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*_d*.safetensors")):
        m = NAME.fullmatch(path.stem)
        if not m:
            continue
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["collapse_probe"])
            params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()
                         if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        ev, col = meta.get("eval", {}), meta.get("collapse", {})
        seed = meta.get("train_config", {}).get("seed", int(m.group(3) or 42))
        out.append({"name": path.stem, "architecture": meta["architecture"], "depth": int(m.group(2)), "seed": seed,
                    "params": params, "top1": round(ev.get("top1", float("nan")), 2),
                    "top5": round(ev.get("top5", float("nan")), 2), "weights": ev.get("weights", ""),
                    "epochs": ev.get("epochs", ""), "similar_blocks": col.get("similar_blocks", ""),
                    "similar_ratio": round(col.get("similar_ratio", float("nan")), 3),
                    "similar_blocks_probs": col.get("similar_blocks_probs", ""), "map_kind": col.get("kind", "")})
    return sorted(out, key=lambda r: (r["architecture"] != "vit_micro", r["depth"], r["seed"] != 42, r["seed"]))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


START, END = "<!-- digits-table:start (checkpoints/summarize.py --readme) -->", "<!-- digits-table:end -->"
FIGURES_SUMMARY = HERE.parent / "figures" / "digits" / "summary.csv"
CALIBRATION_BLOCKS = HERE.parent / "figures" / "calibration" / "blocks.csv"


def redundant_counts(blocks: Path = CALIBRATION_BLOCKS) -> dict[tuple[str, str], int]:
    """(model, role) -> blocks measured redundant (figures/calibration/blocks.csv: reusing the previous block's map in
    the block alone changes < 1 % of predictions and KL < 0.01, the verdict's rule, on the same 360 images)."""
    counts: dict[tuple[str, str], int] = {}
    with open(blocks, newline="") as f:
        for r in csv.DictReader(f):
            key = (r["model"], r["role"])
            counts[key] = counts.get(key, 0) + (r["redundant"] == "True")
    return counts


def readme_table(folder: Path = HERE, measured: Path = FIGURES_SUMMARY, blocks: Path = CALIBRATION_BLOCKS) -> str:
    """The README's digits table: accuracy (metadata, Wilson 95 % interval over the validation images) beside the
    similar-block counts of the model and its untrained twin (figures/digits/summary.csv, bootstrap 95 % intervals)
    and the blocks measured redundant (figures/calibration/blocks.csv)."""
    with open(measured, newline="") as f:
        runs = {r["model"]: r for r in csv.DictReader(f)}
    redundant = redundant_counts(blocks)
    lines = ["| model | depth | seed | params | epochs | top-1 % (95 % CI) | map kind | redundant, measured (twin) | "
             "similar blocks (95 % CI) | untrained twin (95 % CI) | collapsed beyond the twin | regimes |",
             "|---" * 12 + "|"]
    for r in rows(folder):
        with safe_open(str(folder / f"{r['name']}.safetensors"), "pt") as f:
            ev = json.loads(f.metadata()["collapse_probe"]).get("eval", {})
        n = ev.get("val_images") or ev.get("images")
        lo, hi = wilson(round(ev["top1"] / 100 * n), n)
        m, t = runs[r["name"]], runs.get(f"{r['name']} (untrained twin)", {})

        def ci(row: dict) -> str:
            return f"{row['similar_blocks']} ({float(row['count_ci_low']):.0f}-{float(row['count_ci_high']):.0f})" \
                if row.get("count_ci_low") not in (None, "") else str(row.get("similar_blocks", "-"))
        lines.append(f"| {'ViT' if r['architecture'] == 'vit_micro' else 'DeepViT'} | {r['depth']} | {r['seed']} | "
                     f"{r['params']:,} | "
                     f"{r['epochs']} | {ev['top1']:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) | {m['kind']} | "
                     f"{redundant[(r['name'], 'trained')]} / {r['depth']} ({redundant[(r['name'], 'twin')]}) | "
                     f"{ci(m)} / "
                     f"{r['depth']} | {ci(t) if t else '-'} | {m['collapsed_beyond_twin'] or 'none'} | "
                     f"{m['regimes'] or 'none'} |")
    return "\n".join(lines)


def figures_table(measured: Path = FIGURES_SUMMARY) -> str:
    """figures/README.md's table: every probed model beside its untrained twin, from figures/digits/summary.csv."""
    with open(measured, newline="") as f:
        runs = list(csv.DictReader(f))

    def num(v: str, spec: str = ".2f") -> str:
        return "-" if v in ("", None) or v.lower() == "nan" else format(float(v), spec)
    lines = ["| model | kind | similar blocks (95 % CI) | softmax similar blocks | collapsed beyond the twin | "
             "regimes | cross-head mean | feature vs attention r (partial r given block) |", "|---" * 8 + "|"]
    for r in runs:
        ci = f" ({num(r['count_ci_low'], '.0f')}-{num(r['count_ci_high'], '.0f')})" if r["count_ci_low"] else ""
        lines.append(f"| {r['model']} | {r['kind']} | {r['similar_blocks']} / {r['depth']}{ci} | "
                     f"{r['similar_blocks_probs'] or '-'} | {r['collapsed_beyond_twin'] or 'none'} | "
                     f"{r['regimes'] or 'none'} | {num(r['cross_head_mean'])} | {num(r['feature_attention_r'])} "
                     f"({num(r['feature_attention_partial_r'])}) |")
    return "\n".join(lines)


def _rewrite(path: Path, table: str) -> None:
    text = path.read_text()
    i, j = text.index(START) + len(START), text.index(END)
    path.write_text(text[:i] + "\n" + table + "\n" + text[j:])


def rewrite_readme(readme: Path = HERE.parent / "README.md") -> None:
    """Both generated tables: the README's digits table and figures/README.md's per-model table."""
    _rewrite(readme, readme_table())
    _rewrite(HERE.parent / "figures" / "README.md", figures_table())


def main() -> None:
    if sys.argv[1:] == ["--readme"]:
        rewrite_readme()
        return
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
