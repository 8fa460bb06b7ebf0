"""Regenerate the DeepViT paper's analyses (Fig. 1, 3, 4, 8) from any set of checkpoints, with the numbers as CSV.

    collapse-probe figures --checkpoints checkpoints/ --output figures/
    # or from Python:
    from collapse_probe.figures import make_figures
    report = make_figures(["checkpoints/"], "figures", num_images=64)
    print(report.written, report.notes)

Each checkpoint is probed once (one forward pass per batch feeds both the collapse metrics and the mean attention
maps). Models are grouped into families by architecture name (``vit_*`` / ``deepvit_*``) with depth from the
metadata; accuracy for Fig. 1 comes from the safetensors metadata ``collapse_probe.eval.top1`` when the trainer wrote
it. Figures that the checkpoints do not allow are skipped with a note (Fig. 1 and 3(b), "vs depth", need two depths
or more). Every figure follows ``plots.kinds``: softmax maps and maps after Re-attention on separate panels, the
threshold on softmax panels only, one colour scale with a colour bar per map grid. All files are rendered into a
temporary folder next to ``output`` and moved into place at the end, so an interrupted run leaves the previous files
untouched.

CSV columns: ``model`` is the checkpoint's file stem; ``block_number`` counts blocks from 1, as the figures' x axes
and the paper do (``collapse-probe similarity`` reports 0-based block indices).

What is measured and read per checkpoint (``ModelRun``, ``MapAccumulator``, validation size, seed, Θ at init) lives
in ``reports.figure_inputs``; the figures themselves in ``reports.figure_jobs``. ``ModelRun.baseline`` (an untrained
twin's ``ProbeResult``, None unless filled in) is drawn grey dashed beside its run.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
from tqdm.auto import tqdm

from ..errors import BadArgumentError
from ..loading.build import load_model
from ..outputs import MANIFEST, check_replaceable, write_folder
from ..plots.data import ThetaWeights, pick_kind
from ..plots.style import STYLE, family_of
from ..probing.checked import probe
from ..probing.run import LOAD_OPTIONS
from . import figure_jobs as fj
from .figure_inputs import (
    MAP_KINDS,
    MapAccumulator,
    ModelRun,
    checkpoint_top1,
    initial_theta,
    recorded_seed,
    validation_images,
)
from .labels import unique_labels

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def resolve_checkpoints(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their checkpoint files (non-recursive, sorted); duplicates dropped."""
    if not paths:
        raise BadArgumentError("no checkpoints given; pass --checkpoints DIR or one or more checkpoint files")
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise BadArgumentError(f"checkpoint or folder {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in CHECKPOINT_SUFFIXES)
            if not found:
                raise BadArgumentError(f"no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in folder {p}")
            out += found
        else:
            out.append(p)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def measure_checkpoint(path: Path, label: str, **probe_options: Any) -> ModelRun:
    """Load ``path`` safely, probe it (``probing.run.probe`` with ``probe_options``, the option set every command
    shares) and pull Theta, accuracy, validation size and seed from the file (re-creating Θ's initialisation)."""
    load = {k: probe_options.pop(k) for k in LOAD_OPTIONS if k in probe_options}
    loaded = load_model(path, **load)
    maps = MapAccumulator()
    result = probe(loaded, observers=[maps], **probe_options)
    ckpt, arch = loaded.checkpoint, loaded.info.architecture
    meta = ckpt.metadata
    depth = int(meta.get("model_args", {}).get("depth") or loaded.info.depth)
    theta = ThetaWeights.from_state_dict(ckpt.state_dict)
    theta0, theta_note = initial_theta(meta, theta)
    n_val, n_source = validation_images(meta)
    return ModelRun(label, path, arch, family_of(arch), depth, result, maps.result(), theta, checkpoint_top1(meta),
                    val_images=n_val, val_images_source=n_source, seed=recorded_seed(meta), theta_init=theta0,
                    theta_init_note=theta_note, baseline=result.baseline)


@dataclass
class FigureReport:
    """What ``make_figures`` wrote (final paths) and why some figures were skipped."""

    output: Path
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: list[ModelRun] = field(default_factory=list)


Job = tuple[str, Callable[[Path, tuple[str, ...]], None]]  # (name, render(folder, formats))


def _one_depth(runs: Sequence[ModelRun]) -> bool:
    """True when ``runs`` span fewer than two depths: a "vs depth" figure of them would be a single column of points
    (so it is skipped with a note)."""
    return len({r.depth for r in runs}) < 2


def plan_figures(runs: Sequence[ModelRun], threshold: float = 0.9, per_model: bool = False
                 ) -> tuple[list[Job], list[str]]:
    """(name, render(folder)) for every figure ``runs`` allow, and notes on the ones they do not."""
    jobs: list[Job] = []
    notes: list[str] = []
    fams: dict[str, list[ModelRun]] = {}
    for r in runs:
        fams.setdefault(r.family, []).append(r)
    featured = list(runs) if per_model else [max(rs, key=lambda r: r.depth) for rs in fams.values()]
    featured.sort(key=fj.family_order)

    jobs.append(("summary", lambda d, f: fj.summary(runs, d / "summary.csv", threshold)))
    with_acc = [r for r in runs if r.top1 is not None]
    if not with_acc:
        notes.append("Fig. 1 skipped: no checkpoint has eval top-1 accuracy in its metadata (collapse_probe.eval.top1)")
    elif _one_depth(with_acc):
        notes.append(f"Fig. 1 skipped: accuracy vs depth needs checkpoints of two depths or more with eval top-1 "
                     f"accuracy; they are all of depth {with_acc[0].depth}")
    else:
        jobs.append(("fig1", lambda d, f: fj.fig1(with_acc, d / "fig1_accuracy_vs_depth", f)))
    if _one_depth(runs):
        notes.append(f"Fig. 3(b) skipped: similar blocks vs depth needs checkpoints of two depths or more; they are "
                     f"all of depth {runs[0].depth}" if runs else "Fig. 3(b) skipped: no checkpoints")
    else:
        jobs.append(("fig3b", lambda d, f: fj.fig3b(runs, d / "fig3b_similar_blocks_vs_depth", f, threshold)))
    jobs.append(("fig3c", lambda d, f: fj.fig3c(featured, runs, d / "fig3c_cross_head_similarity", f)))
    jobs.append(("sweep", lambda d, f: fj.threshold_sweep(featured, runs, d / "threshold_sweep", f, threshold)))
    for r in featured:
        title = f"{r.label}: similarity with neighbouring blocks (applied maps: {pick_kind(r.result)})"
        jobs.append((f"fig3a {r.label}", lambda d, f, r=r, t=title: fj.fig3a(
            [r], runs, d / f"fig3a_neighbor_similarity_{r.label}", f, threshold, title=t)))
        jobs.append((f"measures {r.label}", lambda d, f, r=r: fj.measures(r, d / f"block_measures_{r.label}", f)))
        jobs.append((f"heatmap {r.label}", lambda d, f, r=r: fj.heatmap(r, d / f"attention_similarity_{r.label}", f)))
        if r.result.features is not None:
            jobs.append((f"fig4 {r.label}", lambda d, f, r=r: fj.fig4(r, d / f"fig4_feature_similarity_{r.label}", f)))
        for kind in MAP_KINDS:
            if kind in r.maps:
                jobs.append((f"maps {r.label} {kind}",
                             lambda d, f, r=r, k=kind: fj.maps(r, k, d / f"fig8_attention_maps_{r.label}_{k}", f)))
        if r.theta is not None:
            jobs.append((f"theta {r.label}", lambda d, f, r=r: fj.theta(r, d / f"fig8_theta_{r.label}", f)))
    vit = {r.depth: r for r in fams.get("vit", [])}
    deep = {r.depth: r for r in fams.get("deepvit", [])}
    common = sorted(set(vit) & set(deep))
    if not common:
        notes.append("Fig. 8 ViT-vs-DeepViT similarity skipped: needs vit_* and deepvit_* checkpoints of equal depth")
    for depth in common if per_model else common[-1:]:
        pair = [vit[depth], deep[depth]]
        jobs.append((f"fig8 d{depth}", lambda d, f, p=pair, n=depth: fj.fig3a(
            p, runs, d / f"fig8_similarity_vit_vs_deepvit_d{n}", f, threshold, ks=(1,),
            title=f"ViT vs DeepViT, {n} blocks: similarity with the previous block, one panel per map kind")))
    return jobs, notes


def make_figures(
    checkpoints: Sequence[str | Path],
    output: str | Path = "figures",
    per_model: bool = False,
    formats: Sequence[str] = ("png", "pdf"),
    save_results: bool = True,
    threshold: float = 0.9,
    progress: bool = True,
    baseline: bool = True,
    **probe_options: Any,
) -> FigureReport:
    """Probe every checkpoint and write every figure they allow (+ CSV of its numbers) as folder ``output``.

    ``per_model``: the per-model figures (3a, heatmap, 4, maps, Θ) for every checkpoint, not only for the deepest
    of each family; ``save_results``: also write each ``ProbeResult`` as ``results/<model>.json`` (without per-image
    rows). ``probe_options`` are the options every command shares (images, num_images, batch_size, model_name,
    num_heads, mean, std, key, trust_pickle, rank_images, neighbors, reduction, max_memory, storage, device; see
    ``probing.run.probe``).
    """
    if not 0.0 <= threshold <= 1.0:
        raise BadArgumentError(f"--threshold must be between 0 and 1, got {threshold}")
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad or not formats:
        raise BadArgumentError(f"figure formats must be png, pdf or svg, got {list(formats)}")
    output = Path(output)
    check_replaceable(output)  # before minutes of probing, not after
    paths = resolve_checkpoints(checkpoints)
    report = FigureReport(output)
    labels = unique_labels(paths, "_", stem=True)  # file names of the figures: unique, or one would replace another
    with tqdm(list(zip(paths, labels)), desc="checkpoints", unit="ckpt", disable=not progress) as bar:
        for i, (path, label) in enumerate(bar, 1):  # closed on any exit, so an interrupt's one line stays the last
            shown = progress and f"checkpoint {i} of {len(paths)} ({label})"
            report.runs.append(measure_checkpoint(path, label, threshold=threshold, progress=shown,
                                                  baseline=baseline, **probe_options))
    jobs, report.notes = plan_figures(report.runs, threshold, per_model)

    def fill(staging: Path) -> None:
        if save_results:
            for r in report.runs:
                (staging / "results").mkdir(exist_ok=True)
                # without per-image rows: hundreds of MB for a folder of 32-block models (summary.csv keeps intervals)
                (staging / "results" / f"{r.label}.json").write_text(r.result.to_json(per_image=False) + "\n")
        with tqdm(jobs, desc="figures", unit="fig", disable=not progress) as bar:
            for name, job in bar:
                with mpl.rc_context(STYLE):  # titles and legends added after the plot functions share their style
                    job(staging, tuple(formats))

    written = write_folder(output, fill=fill)
    report.written = sorted(p for p in written.rglob("*") if p.is_file() and p.name != MANIFEST)
    for n in report.notes:
        log.info(n)
    return report


__all__ = ["FigureReport", "MapAccumulator", "ModelRun", "make_figures", "measure_checkpoint", "plan_figures",
           "resolve_checkpoints"]
