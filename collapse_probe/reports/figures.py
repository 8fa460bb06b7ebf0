"""Regenerate the DeepViT paper's analyses (Fig. 1, 3, 4, 8) from any set of checkpoints, with the numbers as CSV.

    collapse-probe figures --checkpoints checkpoints/ --output figures/
    # or from Python:
    from collapse_probe.figures import make_figures
    report = make_figures(["checkpoints/"], "figures", num_images=64)
    print(report.written, report.notes)

Each checkpoint is probed once (one forward pass per batch feeds both the collapse metrics and the mean attention
maps). Models are grouped into families by architecture name (``vit_*`` / ``deepvit_*``) with depth from the
metadata; accuracy for Fig. 1 comes from the safetensors metadata ``collapse_probe.eval.top1`` when the trainer wrote
it. Figures that the checkpoints do not allow are skipped with a note. All files are rendered into a temporary folder
next to ``output`` and moved into place at the end, so an interrupted run leaves the previous files untouched.

CSV columns: ``model`` is the checkpoint's file stem; ``block_number`` counts blocks from 1, as the figures' x axes
and the paper do (``collapse-probe similarity`` reports 0-based block indices).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import BadArgumentError
from ..hooks.capture import Site
from ..loading.build import load_model
from ..outputs import MANIFEST, check_replaceable, write_folder
from ..plots import depth as pdepth
from ..plots import features as pfeat
from ..plots import maps as pmaps
from ..plots import similarity as psim
from ..plots.data import MeanMaps, ThetaWeights, pick_kind
from ..plots.style import STYLE, family_color, family_of, new_figure, save_figure, styled, write_csv
from ..probing.result import ProbeResult
from ..probing.run import LOAD_OPTIONS, probe

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MAP_KINDS = ("probs", "mixed")


class MapAccumulator:
    """``capture`` callback that sums each block's [B, H, N, N] map over images and heads: memory L x N x N."""

    def __init__(self, kinds: Sequence[str] = MAP_KINDS) -> None:
        self.kinds = tuple(kinds)
        self.sums: dict[Site, torch.Tensor] = {}
        self.images: dict[Site, int] = {}
        self.heads: dict[Site, int] = {}

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        if site.kind not in self.kinds:
            return
        s = t.double().sum(dim=(0, 1)).cpu()
        self.sums[site] = self.sums[site] + s if site in self.sums else s
        self.images[site] = self.images.get(site, 0) + t.shape[0]
        self.heads[site] = t.shape[1]

    def result(self) -> dict[str, MeanMaps]:
        """{kind: MeanMaps} for every kind that was seen; maps [L, N, N] = mean over images and heads."""
        out = {}
        for kind in self.kinds:
            sites = sorted((s for s in self.sums if s.kind == kind), key=lambda s: s.block)
            if sites:
                maps = np.stack([(self.sums[s] / (self.images[s] * self.heads[s])).numpy() for s in sites])
                out[kind] = MeanMaps(kind, [s.block for s in sites], maps, self.images[sites[0]])
        return out


@dataclass
class ModelRun:
    """Everything measured from one checkpoint (results only; the model itself is dropped)."""

    label: str
    path: Path
    architecture: str
    family: str
    depth: int
    result: ProbeResult
    maps: dict[str, MeanMaps]
    theta: ThetaWeights | None
    top1: float | None


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


def _top1(meta: dict[str, Any]) -> float | None:
    ev = meta.get("eval")
    v = ev.get("top1") if isinstance(ev, dict) else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def measure_checkpoint(path: Path, label: str, **probe_options: Any) -> ModelRun:
    """Load ``path`` safely, probe it (``probing.run.probe`` with ``probe_options``, the option set every command
    shares) and pull Theta and accuracy from the file."""
    load = {k: probe_options.pop(k) for k in LOAD_OPTIONS if k in probe_options}
    loaded = load_model(path, **load)
    maps = MapAccumulator()
    result = probe(loaded, observers=[maps], **probe_options)
    ckpt, arch = loaded.checkpoint, loaded.info.architecture
    depth = int(ckpt.metadata.get("model_args", {}).get("depth") or loaded.info.depth)
    return ModelRun(label, path, arch, family_of(arch), depth, result, maps.result(),
                    ThetaWeights.from_state_dict(ckpt.state_dict), _top1(ckpt.metadata))


def _labels(paths: Sequence[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{p.parent.name}_{s}" for s, p in zip(stems, paths)]


@dataclass
class FigureReport:
    """What ``make_figures`` wrote (final paths) and why some figures were skipped."""

    output: Path
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: list[ModelRun] = field(default_factory=list)


# ---------------------------------------------------------------- the figures: each writes <stem>.png/.pdf/.csv


Job = tuple[str, Callable[[Path, tuple[str, ...]], None]]  # (name, render(folder, formats))


def _family_order(run: ModelRun) -> tuple:
    """ViT first, then DeepViT, then anything else; by depth within a family."""
    return ({"vit": 0, "deepvit": 1}.get(run.family, 2), run.family, run.depth)


def _nb(blocks: Sequence[int]) -> list[int]:
    return [b + 1 for b in blocks]


def _color(run: ModelRun, runs: Sequence[ModelRun]) -> Any:
    same = sorted({r.depth for r in runs if r.family == run.family})
    pos = same.index(run.depth) / max(1, len(same) - 1) if len(same) > 1 else 1.0
    return family_color(run.family, pos)


def _fig3a(runs: Sequence[ModelRun], all_runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str], threshold: float,
           ks: Sequence[int] = (1, 2, 3), title: str | None = None, premix: bool = False) -> None:
    """Fig. 3(a) (or Fig. 8's comparison with ``ks=(1,)``); ``premix`` adds Re-attention models' "probs" maps
    (before Theta) as dashed curves, to show what the mixing changed."""
    results = {r.label: r.result for r in runs}
    ax = psim.plot_neighbor_similarity(results, ks=ks, threshold=threshold,
                                       colors={r.label: _color(r, all_runs) for r in runs})
    extra = [r for r in runs if premix and pick_kind(r.result) == "mixed" and "probs" in r.result.attention]
    for r in extra:
        psim.plot_neighbor_similarity({f"{r.label} (probs, before Θ)": r.result}, ks=ks, threshold=None, kind="probs",
                                      colors={f"{r.label} (probs, before Θ)": _color(r, all_runs)}, ax=ax)
        ax.lines[-1].set(ls="--", alpha=0.7)
        ax.legend(loc="best")
    if title:
        ax.set_title(title)
    rows = []
    for r, kind in [(r, pick_kind(r.result)) for r in runs] + [(r, "probs") for r in extra]:
        st = r.result.attention[kind]
        for k in ks:
            rows += [(r.label, kind, k, n, v) for n, v in zip(_nb(st.blocks), st.neighbor(k))]
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "k", "block_number", "similarity"], rows)
    save_figure(ax.figure, stem, fmts)


def _heatmap(run: ModelRun, stem: Path, fmts: Sequence[str]) -> None:
    kind = pick_kind(run.result)
    ax = psim.plot_similarity_heatmap(run.result, kind, title=f"{run.label}: attention similarity ({kind})")
    st = run.result.attention[kind]
    nb = _nb(st.blocks)
    rows = [(run.label, kind, nb[i], nb[j], st.similarity[i, j]) for i in range(len(nb)) for j in range(len(nb))]
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "block_number", "other_block_number", "similarity"], rows)
    save_figure(ax.figure, stem, fmts)


@styled
def _fig3b(runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str], threshold: float) -> None:
    fams: dict[str, list[ModelRun]] = {}
    for r in sorted(runs, key=_family_order):
        fams.setdefault(r.family, []).append(r)
    families = {f: [r.result for r in rs] for f, rs in fams.items()}
    fig = new_figure((9.5, 3.4))
    a1, a2 = fig.subplots(1, 2)
    ref = pdepth.PAPER_SIMILAR_BLOCKS
    pdepth.plot_similar_blocks(families, "count", threshold, reference=ref, ax=a1)
    pdepth.plot_similar_blocks(families, "ratio", threshold, reference=ref, ax=a2)
    rows = []
    for f, rs in fams.items():
        for r in rs:
            kind = pick_kind(r.result)
            s = r.result.summary(kind, threshold)
            rows.append((f, r.label, kind, r.result.depth, s["count"], s["ratio"],
                         " ".join(str(b + 1) for b in s["similar_blocks"])))
    rows += [("paper ViT (ImageNet)", "", "probs", d, c, c / d, "") for d, c in sorted(ref.items())]
    write_csv(stem.with_suffix(".csv"), ["family", "model", "kind", "depth", "similar_blocks", "ratio",
                                         "similar_block_numbers"], rows)
    save_figure(fig, stem, fmts)


def _fig3c(runs: Sequence[ModelRun], all_runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str]) -> None:
    ax = psim.plot_cross_head({r.label: r.result for r in runs}, colors={r.label: _color(r, all_runs) for r in runs})
    rows = []
    for r in runs:
        kind = pick_kind(r.result)
        st = r.result.attention[kind]
        rows += [(r.label, kind, n, v) for n, v in zip(_nb(st.blocks), st.cross_head)]
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "block_number", "cross_head_similarity"], rows)
    save_figure(ax.figure, stem, fmts)


def _fig4(run: ModelRun, stem: Path, fmts: Sequence[str]) -> None:
    kind = pick_kind(run.result)
    axes = pfeat.plot_feature_figure(run.result, kind, title=f"{run.label}: token features vs attention ({kind})")
    f = run.result.features
    nb = _nb(f.blocks)
    rows: list[tuple] = [(run.label, "feature_sim_last", n, nb[-1], v) for n, v in zip(nb, pfeat.feature_vs_last(
        run.result))]
    rows += [(run.label, "feature_similarity", nb[i], nb[j], f.similarity[i, j]) for i in range(len(nb))
             for j in range(len(nb))]
    st = run.result.attention[kind]
    rows += [(run.label, f"attention_sim_prev_{kind}", n, n - 1, v) for n, v in zip(_nb(st.blocks), st.neighbor(1))]
    rows.append((run.label, "pearson_r", "", "", pfeat.feature_attention_correlation(run.result, kind)))
    write_csv(stem.with_suffix(".csv"), ["model", "quantity", "block_number", "other_block_number", "value"], rows)
    save_figure(axes[0].figure, stem, fmts)


def _maps(run: ModelRun, kind: str, stem: Path, fmts: Sequence[str]) -> None:
    m = run.maps[kind]
    what = "self-attention (post-softmax)" if kind == "probs" else "Re-attention (after Θ and norm)"
    axes = pmaps.plot_attention_maps(m, title=f"{run.label}: {what}, mean over heads and {m.count} images")

    def rows():
        for i, b in enumerate(m.blocks):
            for q in range(m.maps.shape[1]):
                yield (run.label, kind, b + 1, q, *(format(v, ".6g") for v in m.maps[i, q]))
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "block_number", "query",
                                         *(f"key_{j}" for j in range(m.maps.shape[2]))], rows())
    save_figure(axes[0].figure, stem, fmts)


def _theta(run: ModelRun, stem: Path, fmts: Sequence[str]) -> None:
    th = run.theta
    axes = pmaps.plot_theta(th, title=f"{run.label}: learned Re-attention Θ per block")
    rows = [(run.label, b + 1, o, i, th.weight[n, o, i]) for n, b in enumerate(th.blocks)
            for o in range(th.weight.shape[1]) for i in range(th.weight.shape[2])]
    write_csv(stem.with_suffix(".csv"), ["model", "block_number", "output_head", "input_head", "weight"], rows)
    save_figure(axes[0].figure, stem, fmts)


def _fig1(runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str]) -> None:
    fams: dict[str, dict[int, float]] = {}
    for r in sorted(runs, key=_family_order):
        fams.setdefault(r.family, {})[r.depth] = r.top1
    ax = pdepth.plot_accuracy_vs_depth(fams)
    rows = [(r.family, r.label, r.depth, r.top1) for r in sorted(runs, key=_family_order)]
    write_csv(stem.with_suffix(".csv"), ["family", "model", "depth", "top1"], rows)
    save_figure(ax.figure, stem, fmts)


def _summary(runs: Sequence[ModelRun], stem: Path, threshold: float) -> None:
    rows = []
    for r in sorted(runs, key=_family_order):
        kind = pick_kind(r.result)
        st = r.result.attention[kind]
        s = r.result.summary(kind, threshold, 1, "mean")
        onset = s["onset"]  # "similar after block X": from here every later block stays above the threshold
        rows.append((r.label, r.architecture, r.family, r.depth, kind, r.result.images.count, r.top1,
                     s["count"], s["ratio"], " ".join(str(b + 1) for b in s["similar_blocks"]),
                     "" if onset is None else onset + 1,
                     r.result.summary("probs", threshold, 1, "mean")["count"] if "probs" in r.result.attention else "",
                     float(np.nanmax(st.cross_head)), float(np.nanmean(st.cross_head)),
                     pfeat.feature_attention_correlation(r.result, kind) if r.result.features else math.nan))
    write_csv(stem, ["model", "architecture", "family", "depth", "kind", "images", "top1", "similar_blocks", "ratio",
                     "similar_block_numbers", "all_similar_from_block", "similar_blocks_probs", "cross_head_max",
                     "cross_head_mean", "feature_attention_r"], rows)


def plan_figures(runs: Sequence[ModelRun], threshold: float = 0.9, per_model: bool = False
                 ) -> tuple[list[Job], list[str]]:
    """(name, render(folder)) for every figure ``runs`` allow, and notes on the ones they do not."""
    jobs: list[Job] = []
    notes: list[str] = []
    fams: dict[str, list[ModelRun]] = {}
    for r in runs:
        fams.setdefault(r.family, []).append(r)
    featured = list(runs) if per_model else [max(rs, key=lambda r: r.depth) for rs in fams.values()]
    featured.sort(key=_family_order)

    jobs.append(("summary", lambda d, f: _summary(runs, d / "summary.csv", threshold)))
    with_acc = [r for r in runs if r.top1 is not None]
    if with_acc:
        jobs.append(("fig1", lambda d, f: _fig1(with_acc, d / "fig1_accuracy_vs_depth", f)))
    else:
        notes.append("Fig. 1 skipped: no checkpoint has eval top-1 accuracy in its metadata (collapse_probe.eval.top1)")
    jobs.append(("fig3b", lambda d, f: _fig3b(runs, d / "fig3b_similar_blocks_vs_depth", f, threshold)))
    jobs.append(("fig3c", lambda d, f: _fig3c(featured, runs, d / "fig3c_cross_head_similarity", f)))
    for r in featured:
        title = f"{r.label}: similarity with neighbouring blocks ({pick_kind(r.result)})"
        jobs.append((f"fig3a {r.label}", lambda d, f, r=r, t=title: _fig3a(
            [r], runs, d / f"fig3a_neighbor_similarity_{r.label}", f, threshold, title=t)))
        jobs.append((f"heatmap {r.label}", lambda d, f, r=r: _heatmap(r, d / f"attention_similarity_{r.label}", f)))
        if r.result.features is not None:
            jobs.append((f"fig4 {r.label}", lambda d, f, r=r: _fig4(r, d / f"fig4_feature_similarity_{r.label}", f)))
        for kind in MAP_KINDS:
            if kind in r.maps:
                jobs.append((f"maps {r.label} {kind}",
                             lambda d, f, r=r, k=kind: _maps(r, k, d / f"fig8_attention_maps_{r.label}_{k}", f)))
        if r.theta is not None:
            jobs.append((f"theta {r.label}", lambda d, f, r=r: _theta(r, d / f"fig8_theta_{r.label}", f)))
    vit = {r.depth: r for r in fams.get("vit", [])}
    deep = {r.depth: r for r in fams.get("deepvit", [])}
    common = sorted(set(vit) & set(deep))
    if not common:
        notes.append("Fig. 8 ViT-vs-DeepViT similarity skipped: needs vit_* and deepvit_* checkpoints of equal depth")
    for depth in common if per_model else common[-1:]:
        pair = [vit[depth], deep[depth]]
        jobs.append((f"fig8 d{depth}", lambda d, f, p=pair, n=depth: _fig3a(
            p, runs, d / f"fig8_similarity_vit_vs_deepvit_d{n}", f, threshold, ks=(1,),
            title=f"ViT vs DeepViT, {n} blocks: similarity with the previous block", premix=True)))
    return jobs, notes


def make_figures(
    checkpoints: Sequence[str | Path],
    output: str | Path = "figures",
    per_model: bool = False,
    formats: Sequence[str] = ("png", "pdf"),
    save_results: bool = True,
    threshold: float = 0.9,
    progress: bool = True,
    **probe_options: Any,
) -> FigureReport:
    """Probe every checkpoint and write every figure they allow (+ CSV of its numbers) as folder ``output``.

    ``per_model``: the per-model figures (3a, heatmap, 4, maps, Θ) for every checkpoint, not only for the deepest
    of each family; ``save_results``: also write each ``ProbeResult`` as ``results/<model>.json``. ``probe_options``
    are the options every command shares (images, num_images, batch_size, model_name, num_heads, mean, std, key,
    trust_pickle, rank_images, neighbors, reduction, max_memory, storage, device; see ``probing.run.probe``).
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
    with tqdm(list(zip(paths, _labels(paths))), desc="checkpoints", unit="ckpt", disable=not progress) as bar:
        for path, label in bar:  # closed on any exit, so an interrupt's one line stays the last on stderr
            report.runs.append(measure_checkpoint(path, label, threshold=threshold, progress=progress,
                                                  **probe_options))
    jobs, report.notes = plan_figures(report.runs, threshold, per_model)

    def fill(staging: Path) -> None:
        if save_results:
            for r in report.runs:
                (staging / "results").mkdir(exist_ok=True)
                (staging / "results" / f"{r.label}.json").write_text(r.result.to_json() + "\n")
        with tqdm(jobs, desc="figures", unit="fig", disable=not progress) as bar:
            for name, job in bar:
                with mpl.rc_context(STYLE):  # titles and legends added after the plot functions share their style
                    job(staging, tuple(formats))

    written = write_folder(output, fill=fill)
    report.written = sorted(p for p in written.rglob("*") if p.is_file() and p.name != MANIFEST)
    for n in report.notes:
        log.info(n)
    return report


__all__ = ["MapAccumulator", "ModelRun", "resolve_checkpoints", "measure_checkpoint",
           "FigureReport", "plan_figures", "make_figures"]
