"""The ``intervene`` command (plan, measure, write) and the verdict sentences of an intervention report.

    report = run_intervene("checkpoints/vit_micro_d32.safetensors", "reuse", sweep=True, images="builtin:digits")
    write_intervention(report, "figures/intervention/vit_micro_d32")   # intervention.csv, .json, .png + manifest
    intervention_sentences(report)[16]   # "Reusing block 17's map in blocks 18-32 changes 4.7 % of ..."

``check_flagged(model_or_loaded, images, collapsed_blocks)`` (from ``probing.intervene``, re-exported here) runs the
cheap checks (reuse, skip) of blocks you flag and ``intervention_sentences`` turns its report into sentences; the
verdict itself measures every block (``probing.redundancy``).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..errors import BadArgumentError
from ..hooks.intervene import intervention_blocks
from ..outputs import write_folder
from ..probing import outcome
from ..probing.intervene import check_flagged, measure
from ..probing.outcome import COLUMNS, Intervention, InterventionReport, wilson
from ..probing.run import LOAD_OPTIONS, open_model
from .intervene_options import check_request

MEASURE_OPTIONS = ("images", "num_images", "batch_size", "device", "progress", "workers")
PROBE_OPTIONS = ("threshold", "entry_threshold", "neighbors", "reduction", "rank_images", "max_memory", "storage",
                 "baseline_seed")
FILES = ("intervention.csv", "intervention.json", "intervention.png")


def plan(mode: str, depth: int, from_block: int | None = None, blocks: list[int] | None = None,
         source: int | None = None, sweep: bool = False) -> list[Intervention]:
    """The interventions asked for, with 1-based block numbers in (as on the command line)."""
    check_request(from_block, blocks, sweep, source)
    if sweep:
        if depth < 2:
            raise BadArgumentError(f"--sweep needs at least 2 blocks, the model has {depth}")
        return outcome.sweep(mode, depth)
    if from_block is not None:
        return [outcome.from_block(mode, from_block, depth)]
    return [outcome.one_block(mode, b, depth, source) for b in blocks or []]


def run_intervene(checkpoint: Any, mode: str = "reuse", from_block: int | None = None,
                  blocks: list[int] | None = None, source: int | None = None, sweep: bool = False,
                  similarity: bool = True, **options: Any) -> InterventionReport:
    """Load ``checkpoint`` (every loading check), plan the interventions against its depth and measure them.

    ``options``: the shared probe options (``LOAD_OPTIONS`` for reading, ``MEASURE_OPTIONS`` for the images,
    ``PROBE_OPTIONS`` for the similarity curve, probed once when ``similarity``).
    """
    check_request(from_block, blocks, sweep, source)
    unknown = set(options) - set(LOAD_OPTIONS) - set(MEASURE_OPTIONS) - set(PROBE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    load = {k: v for k, v in options.items() if k in LOAD_OPTIONS}
    loaded, dev, _ = open_model(checkpoint, options.get("device"), **load)
    ivs = plan(mode, len(intervention_blocks(loaded.model)), from_block, blocks, source, sweep)
    kw = {k: v for k, v in options.items() if k in MEASURE_OPTIONS and k != "device"}
    # the report shows no rank: one image's rank (not every image's SVD) unless a caller asks
    probe_options = {"rank_images": 1, **{k: v for k, v in options.items() if k in PROBE_OPTIONS}}
    return measure(loaded, interventions=ivs, device=dev, similarity=similarity, probe_options=probe_options, **kw)


def _num(v: float, spec: str) -> str:
    return "-" if math.isnan(v) else format(v, spec)


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.1f} %"


def _ci(lo: float, hi: float) -> str:
    return "-" if math.isnan(lo) else f"{100 * lo:.1f}-{100 * hi:.1f} %"


def intervention_sentences(report: InterventionReport) -> list[str]:
    """One sentence per measured intervention, citing its numbers, plus one per refused intervention.

    e.g. "Reusing block 17's map in blocks 18-32 changes 0.3 % of top-1 predictions (1 of 360 images, 95 % CI
    0.0-1.6 %), mean KL 0.003, final-feature cosine 0.998; accuracy 79.7 % → 79.4 % (-0.3 points)."
    """
    out = []
    for o in report.outcomes:
        what = o.intervention.describe()
        what = what[0].upper() + what[1:]
        if o.changed is None:
            out.append(f"{what} leaves the final features at mean cosine {o.cosine:.3f} over {o.images} images (the "
                       "model has no classifier, so no predictions to compare).")
            continue
        text = (f"{what} changes {_pct(o.changed / max(o.images, 1))} of top-1 predictions ({o.changed} of "
                f"{o.images} images, 95 % CI {_ci(*o.changed_interval())}), mean KL {o.kl:.3g}, final-feature "
                f"cosine {o.cosine:.3f}")
        if o.labelled:
            text += (f"; accuracy {_pct(o.accuracy_orig)} (95 % CI {_ci(*wilson(o.correct_orig, o.labelled))}) → "
                     f"{_pct(o.accuracy)} ({_ci(*wilson(o.correct, o.labelled))}), "
                     f"{100 * (o.accuracy - o.accuracy_orig):+.1f} points")
        out.append(text + ".")
    out.extend(f"Not checked: {line}." for line in report.refused)
    return out


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def to_csv(report: InterventionReport) -> str:
    """The rows (``outcome.COLUMNS``) as CSV: full-precision floats, NaN as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows([_cell(r[c]) for c in COLUMNS] for r in report.rows())
    return buf.getvalue()


def to_table(report: InterventionReport) -> str:
    """A fixed-width table, one line per intervention (1-based blocks)."""
    head = f"{'mode':8s}{'k':>4s}  {'intervened':12s}{'changed':>9s} {'95% CI':>14s}{'KL':>10s}{'cosine':>8s}" \
           f"{'acc orig':>10s}{'acc':>9s}{'sim k-1':>9s}"
    name = report.model.architecture or report.model.checkpoint or "model"
    lines = [f"{name}: {report.images.count} images ({report.images.source})", head]
    for r in report.rows():
        lines.append(f"{r['mode']:8s}{r['block']:>4d}  {r['blocks']:12s}{_pct(r['changed']):>9s} "
                     f"{_ci(r['changed_ci_low'], r['changed_ci_high']):>14s}{_num(r['kl'], '.4g'):>10s}"
                     f"{_num(r['cosine'], '.3f'):>8s}{_pct(r['accuracy_orig']):>10s}{_pct(r['accuracy']):>9s}"
                     f"{_num(r['sim_prev'], '.3f'):>9s}")
    lines.extend(f"not checked: {line}" for line in report.refused)
    return "\n".join(lines) + "\n"


def render(report: InterventionReport, fmt: str = "table") -> str:
    """``fmt``: "table", "json" or "csv"."""
    if fmt == "json":
        return report.to_json() + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt == "table":
        return to_table(report)
    raise BadArgumentError(f"--format must be table, json or csv, got {fmt!r}")


def intervention_files(report: InterventionReport) -> dict[str, bytes]:
    """intervention.csv, intervention.json and intervention.png (output change next to the similarity curve)."""
    from ..plots.intervene import plot_intervention_figure
    from ..plots.report import figure_png

    axes = plot_intervention_figure(report)
    return {"intervention.csv": to_csv(report).encode(), "intervention.json": (report.to_json() + "\n").encode(),
            "intervention.png": figure_png(axes[0].figure)}


def write_intervention(report: InterventionReport, output: str | Path) -> Path:
    """Write ``intervention_files`` as folder ``output`` (``outputs.write_folder``: atomic, manifest-owned)."""
    return write_folder(output, intervention_files(report))


def command(checkpoint: Any, mode: str, from_block: int | None, blocks: list[int] | None, source: int | None,
            sweep: bool, fmt: str, output: Path | None, **options: Any) -> tuple[str, Path | None]:
    """The ``intervene`` command: (what stdout gets, the folder written or None); requests and the output folder
    are checked before anything is loaded."""
    from ..outputs import check_replaceable

    check_request(from_block, blocks, sweep, source)
    if output is not None:
        check_replaceable(output)
    report = run_intervene(checkpoint, mode, from_block, blocks, source, sweep, **options)
    if output is not None:
        write_intervention(report, output)
    return render(report, fmt).rstrip("\n"), output


__all__ = [
    "check_flagged",
    "check_request",
    "command",
    "intervention_files",
    "intervention_sentences",
    "plan",
    "render",
    "run_intervene",
    "to_csv",
    "to_table",
    "write_intervention",
]
