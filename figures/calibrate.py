"""Calibrate the verdict against interventions on the bundled checkpoints: figures/calibration/{blocks.csv,
agreement.csv, calibration.png} and the generated table of figures/calibration/README.md.

    python figures/calibrate.py                      # every checkpoints/*_d*.safetensors and its untrained twin
    python figures/calibrate.py --only vit_micro_d8  # one model (appends / replaces its rows in blocks.csv)
    python figures/calibrate.py --summarize          # agreement.csv, the PNG and the README table from blocks.csv

Per block of each model and twin: the verdict's labels (collapse_probe.reports.calibration) beside the measured output
change of reusing the previous block's map in that block alone, on the 360 validation digits. Takes about a minute per
32-block model and twin on one CPU core.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "calibration"
CKPTS = HERE.parent / "checkpoints"
START, END = "<!-- calibration-table:start (figures/calibrate.py --summarize) -->", "<!-- calibration-table:end -->"
LABEL_TEXT = {"similar": "similar, paper's metric (mean reduction)", "similar_ratio": "similar, paper's metric (ratio "
              "reduction)", "beyond_twin": "collapsed beyond the twin", "uniform": "regime: uniform",
              "token_uniform": "regime: token-uniform",
              "repeating_regime": "regime: repeating (the centred pattern repeats beyond the twin)",
              "interchangeable": "interchangeable (the verdict's rule)"}


def measure(names: list[str]) -> pd.DataFrame:
    from collapse_probe.reports.calibration import calibrate

    frames = []
    for name in names:
        print(f"calibrating {name}", file=sys.stderr, flush=True)
        frames.append(pd.DataFrame(calibrate(CKPTS / f"{name}.safetensors", "builtin:digits")))
    return pd.concat(frames, ignore_index=True)


def table(agree: pd.DataFrame) -> str:
    lines = ["| blocks of | label | blocks | predicted redundant | precision (95 % CI, cluster) | recall (95 % CI, "
             "cluster) |", "|---|---|---|---|---|---|"]
    for r in agree.itertuples():
        def pr(v: float, lo: float, hi: float) -> str:
            return "-" if pd.isna(v) else f"{v:.2f} ({lo:.2f}-{hi:.2f})"
        lines.append(f"| {r.role} | {LABEL_TEXT.get(r.label, r.label)} | {r.blocks} | {r.tp + r.fp} | "
                     f"{pr(r.precision, r.precision_cluster_ci_low, r.precision_cluster_ci_high)} | "
                     f"{pr(r.recall, r.recall_cluster_ci_low, r.recall_cluster_ci_high)} |")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    from collapse_probe.probing.blocks import JSD_INTERCHANGEABLE
    from collapse_probe.probing.redundancy import MAX_CHANGED

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)
    groups = [("trained ViT (softmax maps)", (df.role == "trained") & (df.kind == "probs"), "C0", "o"),
              ("trained DeepViT (maps after Re-attention)", (df.role == "trained") & (df.kind == "mixed"), "C1", "s"),
              ("untrained twins", df.role == "twin", "0.6", ".")]
    floor = 1e-3  # no change at all (0) is drawn here on the log axis

    def y(v: pd.Series) -> pd.Series:
        return v.clip(lower=floor)
    for ax, (x, xlabel) in zip(axes, (("sim_prev", "paper's similarity with the previous block (Eq. 3, mean)"),
                                      ("jsd_prev", "row Jensen-Shannon divergence from the previous block's map"))):
        for label, mask, colour, marker in groups:
            part = df[mask & df.reuse_changed.notna()]
            ax.scatter(part[x], y(part.reuse_changed), s=14, c=colour, marker=marker, label=label, alpha=0.8,
                       linewidths=0)
        ax.axhline(MAX_CHANGED, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("predictions changed by reuse (0 at 1e-3)")
    axes[0].axvline(0.9, color="C3", lw=0.8, ls=":")
    axes[0].set_title("the paper's criterion: similar if > 0.9 (dotted)", fontsize=10)
    axes[1].axvline(JSD_INTERCHANGEABLE, color="C3", lw=0.8, ls=":")
    axes[1].set_xscale("log")
    axes[1].set_title(f"the verdict's map rule: interchangeable if < {JSD_INTERCHANGEABLE} (dotted)", fontsize=10)
    ax = axes[2]  # the intervention beside its own baseline: removing the block outright
    for label, mask, colour, marker in groups[:2]:
        part = df[mask & df.reuse_changed.notna() & df.skip_changed.notna()]
        ax.scatter(y(part.skip_changed), y(part.reuse_changed), s=14, c=colour, marker=marker, alpha=0.8,
                   linewidths=0)
    ax.plot([floor, 1], [floor, 1], color="0.5", lw=0.8)
    ax.axhline(MAX_CHANGED, color="k", lw=0.8, ls="--")
    ax.axvline(MAX_CHANGED, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predictions changed by skipping the block alone (0 at 1e-3)")
    ax.set_ylabel("predictions changed by reuse (0 at 1e-3)")
    ax.set_title("reuse beside its baseline, trained models (grey: equal)", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def controls(df: pd.DataFrame) -> pd.DataFrame:
    """Per trained model: the paper's count during training (the trainer's collapse.csv, 64 validation images) beside
    the final count, the twin's and uniform attention's, and the measured redundant blocks split by whether their
    softmax maps are still near-uniform (entropy >= 0.95 of log N): which control separates what training did."""
    import csv

    rows = []
    for model, part in df.groupby("model"):
        trained, twin = part[part.role == "trained"], part[part.role == "twin"]
        log = CKPTS / "logs" / model / "collapse.csv"
        early = {}
        if log.exists():
            for r in csv.DictReader(log.open()):
                early[int(r["epoch"])] = early.get(int(r["epoch"]), 0) + int(r["similar"])
        red = trained[trained.redundant == True]  # noqa: E712  (a column of True / False / NaN)
        flat = red[red.probs_entropy >= 0.95]
        rows.append({"model": model, "kind": trained.kind.iloc[0], "depth": int(trained.depth.iloc[0]),
                     "paper_count_epoch5": early.get(5), "paper_count_epoch20": early.get(20),
                     "paper_count_final_tracking": early[max(early)] if early else None,
                     "paper_count": int(trained.similar.sum()), "twin_count": int(twin.similar.sum()),
                     "uniform_count": int(trained.sim_prev.notna().sum()),
                     "twin_min_entropy": float(twin.probs_entropy.min()),
                     "redundant": len(red), "redundant_near_uniform": len(flat),
                     "twin_redundant": int((twin.redundant == True).sum())})  # noqa: E712
    return pd.DataFrame(rows)


def summarize() -> None:
    from collapse_probe.reports.calibration import agreement

    df = pd.read_csv(OUT / "blocks.csv")
    agree = pd.DataFrame(agreement(df))
    agree.to_csv(OUT / "agreement.csv", index=False)
    controls(df).to_csv(OUT / "controls.csv", index=False)
    plot(df, OUT / "calibration.png")
    readme = OUT / "README.md"
    text = readme.read_text() if readme.exists() else f"# Calibration\n\n{START}\n{END}\n"
    i, j = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:i] + "\n" + table(agree) + "\n" + text[j:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="checkpoint names (without .safetensors)")
    ap.add_argument("--summarize", action="store_true", help="only rebuild agreement.csv, the PNG and the README")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    if not args.summarize:
        names = args.only or sorted(p.stem for p in CKPTS.glob("*_d*.safetensors"))
        new = measure(names)
        old = pd.read_csv(OUT / "blocks.csv") if (OUT / "blocks.csv").exists() and args.only else None
        df = new if old is None else pd.concat([old[~old.model.isin(names)], new], ignore_index=True)
        df.sort_values(["model", "role", "block"]).to_csv(OUT / "blocks.csv", index=False)
    summarize()


if __name__ == "__main__":
    main()
