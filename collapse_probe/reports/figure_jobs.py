"""The figures of ``collapse-probe figures``: each job draws one figure from ``ModelRun`` results and writes
``<stem>.png`` (+ .pdf / .svg) and ``<stem>.csv`` with the numbers it plots. ``reports.figures.plan_figures`` decides
which jobs the checkpoints allow.

CSV conventions: ``model`` is the checkpoint's file stem, ``<stem> (untrained twin)`` for a run's untrained baseline;
``block_number`` counts blocks from 1; ``kind`` is the map kind ("probs": softmax; "mixed": after Θ + BatchNorm).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..plots import depth as pdepth
from ..plots import features as pfeat
from ..plots import maps as pmaps
from ..plots import similarity as psim
from ..plots.data import pick_kind
from ..plots.kinds import PANEL_TITLES
from ..plots.kinds import present as kinds_of
from ..plots.style import family_color, kind_name, new_figure, save_figure, styled, write_csv
from ..probing.blocks import Criterion
from ..probing.result import ProbeResult
from ..probing.verdict import judge, spans, sweep
from .figure_inputs import ModelRun

MAX_HEAD_PANELS = 64  # beyond this (blocks x heads) the single-image figure shows head 0 only; the CSV has all


def twin(label: str) -> str:
    """The CSV name of a run's untrained baseline."""
    return f"{label} (untrained twin)"


def family_order(run: ModelRun) -> tuple:
    """ViT first, then DeepViT, then anything else; by depth within a family."""
    return ({"vit": 0, "deepvit": 1}.get(run.family, 2), run.family, run.depth)


def _nb(blocks: Sequence[int]) -> list[int]:
    return [b + 1 for b in blocks]


def _color(run: ModelRun, runs: Sequence[ModelRun]) -> Any:
    same = sorted({r.depth for r in runs if r.family == run.family})
    pos = same.index(run.depth) / max(1, len(same) - 1) if len(same) > 1 else 1.0
    return family_color(run.family, pos)


def _with_twins(runs: Sequence[ModelRun]) -> Iterator[tuple[str, ProbeResult, ProbeResult]]:
    """(CSV model name, result, the trained run's result) for every run and every baseline a run carries."""
    for r in runs:
        yield r.label, r.result, r.result
        if r.baseline is not None:
            yield twin(r.label), r.baseline, r.result


def _kinds(res: ProbeResult) -> list[str]:
    return [k for k in ("probs", "mixed") if k in res.attention] + [k for k in res.attention if k not in
                                                                      ("probs", "mixed")]


def fig3a(runs: Sequence[ModelRun], all_runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str], threshold: float,
          ks: Sequence[int] = (1, 2, 3), title: str | None = None) -> None:
    """Fig. 3(a) (or Fig. 8's ViT-vs-DeepViT comparison with ``ks=(1,)``): one panel per map kind, so softmax curves
    and post-BatchNorm curves never share a y scale or the threshold line."""
    axes = psim.plot_neighbor_similarity_by_kind(
        {r.label: r.result for r in runs}, ks, threshold, colors={r.label: _color(r, all_runs) for r in runs},
        baselines={r.label: r.baseline for r in runs if r.baseline is not None})
    if title:
        axes[0].figure.suptitle(title)
    rows = []
    for name, res, trained in _with_twins(runs):
        for kind in _kinds(res):
            st = res.attention[kind]
            for k in ks:
                rows += [(name, kind, int(kind == trained.applied_kind), k, n, v)
                         for n, v in zip(_nb(st.blocks), st.neighbor(k))]
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "applied", "k", "block_number", "similarity"], rows)
    save_figure(axes[0].figure, stem, fmts)


def heatmap(run: ModelRun, stem: Path, fmts: Sequence[str]) -> None:
    kind = pick_kind(run.result)
    ax = psim.plot_similarity_heatmap(run.result, kind, title=f"{run.label}: attention similarity ({kind})")
    st = run.result.attention[kind]
    nb = _nb(st.blocks)
    rows = [(run.label, kind, nb[i], nb[j], st.similarity[i, j]) for i in range(len(nb)) for j in range(len(nb))]
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "block_number", "other_block_number", "similarity"], rows)
    save_figure(ax.figure, stem, fmts)


def _entry_cuts(runs: Sequence[ModelRun]) -> str:
    cuts = sorted({float(st.threshold) for r in runs for st in r.result.attention.values()})
    return "/".join(f"{c:g}" for c in cuts) or "?"


@styled
def fig3b(runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str], threshold: float) -> None:
    """Fig. 3(b): similar blocks / depth against depth, one row per map kind (``plots.kinds``: softmax maps of ViT and
    of DeepViT before Θ; maps after Θ + BatchNorm), one column per reduction, the paper's ratios on a panel of their
    own. The CSV has counts and ratios of both kinds."""
    fams: dict[str, list[ModelRun]] = {}
    for r in sorted(runs, key=family_order):
        fams.setdefault(r.family, []).append(r)
    families = {f: [r.result for r in rs] for f, rs in fams.items()}
    twins = {f: [r.baseline for r in rs if r.baseline is not None] for f, rs in fams.items()}
    twins = {f: t for f, t in twins.items() if t}
    kinds = kinds_of([r.result for r in runs])
    fig = new_figure((14.0, 3.1 * len(kinds) + 1.0))
    gs = fig.add_gridspec(len(kinds), 3, width_ratios=[1.0, 1.0, 0.8])
    cut = _entry_cuts(runs)
    for row, kind in enumerate(kinds):
        for col, reduction in enumerate(("mean", "ratio")):
            ax = pdepth.plot_similar_blocks(families, "ratio", threshold, reduction=reduction, kind=kind,
                                            baselines=twins, ax=fig.add_subplot(gs[row, col]))
            ax.set_title(f"{PANEL_TITLES.get(kind, kind)}\nreduction: {reduction}", fontsize=9)
            if col == 0 and ax.get_legend() is not None:  # the row's legend once, right of its last panel
                ax.get_legend().remove()
    pdepth.plot_paper_similar_blocks("ratio", ax=fig.add_subplot(gs[:, 2]))
    fig.suptitle(f"Ratio of similar blocks vs depth (similarity with the previous block > {threshold:g}), one row per "
                 "map kind, for two readings of the paper, whose own reduction is unpublished:\n"
                 f"mean = mean column cosine > {threshold:g}; ratio = fraction of column cosines above {cut} (the "
                 f"per-entry cut) > {threshold:g}. Counts: the CSV", fontsize=9)
    rows: list[tuple] = []
    for f, rs in fams.items():
        for r in rs:
            for name, res, trained in [(r.label, r.result, r.result)] + (
                    [(twin(r.label), r.baseline, r.result)] if r.baseline is not None else []):
                applied = trained.applied_kind
                kinds = [applied] + (["probs"] if applied == "mixed" and "probs" in res.attention else [])
                for kind in [k for k in kinds if k in res.attention]:
                    for reduction in ("mean", "ratio"):
                        s = res.summary(kind, threshold, 1, reduction)
                        rows.append((f, name, kind, reduction, res.depth, s["count"], s["ratio"],
                                     " ".join(map(str, s["similar_blocks"])),
                                     res.attention[kind].threshold))
    for fam, table in (("paper ViT (ImageNet)", pdepth.PAPER_SIMILAR_BLOCKS),
                       ("paper DeepViT (ImageNet)", pdepth.PAPER_SIMILAR_BLOCKS_DEEPVIT)):
        rows += [(fam, "", "unpublished", "unpublished", d, c, c / d, "", "") for d, c in sorted(table.items())]
    write_csv(stem.with_suffix(".csv"), ["family", "model", "kind", "reduction", "depth", "similar_blocks", "ratio",
                                         "similar_block_numbers", "entry_cut"], rows)
    save_figure(fig, stem, fmts)


def fig3c(runs: Sequence[ModelRun], all_runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str]) -> None:
    """Fig. 3(c): cross-head similarity, one panel per map kind (the paper's 0.3 on the softmax panel only)."""
    axes = psim.plot_cross_head_by_kind({r.label: r.result for r in runs},
                                        colors={r.label: _color(r, all_runs) for r in runs},
                                        baselines={r.label: r.baseline for r in runs if r.baseline is not None})
    rows = []
    for name, res, trained in _with_twins(runs):
        for kind in _kinds(res):
            st = res.attention[kind]
            rows += [(name, kind, int(kind == trained.applied_kind), n, v) for n, v in zip(_nb(st.blocks),
                                                                                           st.cross_head)]
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "applied", "block_number", "cross_head_similarity"], rows)
    save_figure(axes[0].figure, stem, fmts)


def fig4(run: ModelRun, stem: Path, fmts: Sequence[str]) -> None:
    """Fig. 4, with the partial correlation given the block index next to the raw Pearson r."""
    kind = pick_kind(run.result)
    base = run.baseline if run.baseline is not None and run.baseline.features is not None else None
    axes = pfeat.plot_feature_figure(run.result, kind, title=f"{run.label}: token features vs attention ({kind})",
                                     baseline=base)
    rows: list[tuple] = []
    for name, res in [(run.label, run.result)] + ([(twin(run.label), base)] if base is not None else []):
        f = res.features
        nb = _nb(f.blocks)
        k = kind if kind in res.attention else res.applied_kind
        rows += [(name, "feature_sim_last", n, nb[-1], v) for n, v in zip(nb, pfeat.feature_vs_last(res))]
        rows += [(name, "feature_similarity", nb[i], nb[j], f.similarity[i, j]) for i in range(len(nb))
                 for j in range(len(nb))]
        st = res.attention[k]
        rows += [(name, f"attention_sim_prev_{k}", n, n - 1, v) for n, v in zip(_nb(st.blocks), st.neighbor(1))]
        rows.append((name, "pearson_r", "", "", pfeat.feature_attention_correlation(res, k)))
        rows.append((name, "partial_r_given_block", "", "", pfeat.feature_attention_partial_correlation(res, k)))
    write_csv(stem.with_suffix(".csv"), ["model", "quantity", "block_number", "other_block_number", "value"], rows)
    save_figure(axes[0].figure, stem, fmts)


def maps(run: ModelRun, kind: str, stem: Path, fmts: Sequence[str]) -> None:
    """Fig. 8 map grids: softmax maps averaged over heads and images; centred "mixed" maps (which average out) as
    single heads of the first image. One colour scale for all panels with a colour bar that states it
    (``plots.kinds.map_scale``), class token marked."""
    m = run.maps[kind]
    prefix = run.result.model.num_prefix_tokens
    single = kind == "mixed" and m.first_image is not None
    if single:
        L, H = m.first_image.shape[:2]
        heads = list(range(H)) if L * H <= MAX_HEAD_PANELS else [0]
        which = f"all {H} heads" if len(heads) > 1 else f"head 0 of {H} (all heads in the CSV)"
        axes = pmaps.plot_head_maps(m, heads, prefix_tokens=prefix, title=(
            f"{run.label}: Re-attention maps after Θ + BatchNorm (centred, signed) of one image (the first of "
            f"{m.count}), {which}\none colour scale for all panels (colour bar); cls = class token"))
    else:
        what = "self-attention (post-softmax)" if kind == "probs" else "Re-attention (after Θ and norm)"
        axes = pmaps.plot_attention_maps(m, prefix_tokens=prefix, title=(
            f"{run.label}: {what}, mean over heads and {m.count} images\none colour scale for all blocks (colour "
            "bar); cls = class token"))

    def rows() -> Iterator[tuple]:
        n = m.maps.shape[2]
        if single:
            for i, b in enumerate(m.blocks):
                for h in range(m.first_image.shape[1]):
                    for q in range(n):
                        yield (run.label, kind, "first", h, b + 1, q,
                               *(format(v, ".6g") for v in m.first_image[i, h, q]))
        else:
            for i, b in enumerate(m.blocks):
                for q in range(n):
                    yield (run.label, kind, f"mean of {m.count}", "mean", b + 1, q,
                           *(format(v, ".6g") for v in m.maps[i, q]))
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "image", "head", "block_number", "query",
                                         *(f"key_{j}" for j in range(m.maps.shape[2]))], rows())
    save_figure(axes[0].figure, stem, fmts)


def theta(run: ModelRun, stem: Path, fmts: Sequence[str]) -> None:
    """Θ per block: final, at initialisation and their difference when the init can be re-created, else final only
    (the title says why)."""
    th, th0 = run.theta, run.theta_init
    if th0 is not None:
        axes = pmaps.plot_theta_change(th, th0, title=f"{run.label}: Re-attention Θ after training vs at "
                                                       f"initialisation ({run.theta_init_note})")
        rel = th.relative_change(th0)
    else:
        axes = pmaps.plot_theta(th, title=f"{run.label}: learned Re-attention Θ per block (Θ at initialisation not "
                                          f"shown: {run.theta_init_note or 'not re-created'})")
        rel = np.full(len(th.blocks), math.nan)
    rows = []
    for n, b in enumerate(th.blocks):
        for o in range(th.weight.shape[1]):
            for i in range(th.weight.shape[2]):
                w0 = th0.weight[n, o, i] if th0 is not None else math.nan
                rows.append((run.label, b + 1, o, i, th.weight[n, o, i], w0, th.weight[n, o, i] - w0, rel[n]))
            if th.bias is not None:  # the bias rows: input_head "bias"; not part of the relative change
                b0 = th0.bias[n, o] if th0 is not None and th0.bias is not None else math.nan
                rows.append((run.label, b + 1, o, "bias", th.bias[n, o], b0, th.bias[n, o] - b0, rel[n]))
    write_csv(stem.with_suffix(".csv"), ["model", "block_number", "output_head", "input_head", "final", "init",
                                         "change", "relative_change_block"], rows)
    save_figure(axes[0].figure, stem, fmts)


def fig1(runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str]) -> None:
    """Fig. 1: one point per (family, depth), checkpoints of both equal (seeds) pooled; Wilson 95% bars over the
    validation images (pooled over seeds: image sampling only, not the spread between seeds)."""
    groups: dict[tuple[str, int], list[ModelRun]] = {}
    for r in sorted(runs, key=family_order):
        groups.setdefault((r.family, r.depth), []).append(r)
    accs: dict[str, dict[int, float]] = {}
    cis: dict[str, dict[int, tuple[float, float]]] = {}
    seeds: dict[str, dict[int, int]] = {}
    per_seed: dict[str, dict[int, list[float]]] = {}
    rows = []
    for (fam, depth), rs in groups.items():
        tops = [float(r.top1) for r in rs]
        known = all(r.val_images for r in rs)
        correct = sum(round(t / 100 * r.val_images) for t, r in zip(tops, rs)) if known else None
        total = sum(r.val_images for r in rs) if known else None
        lo, hi = pdepth.wilson_interval(correct, total) if known else (math.nan, math.nan)
        accs.setdefault(fam, {})[depth] = float(np.mean(tops))
        cis.setdefault(fam, {})[depth] = (100 * lo, 100 * hi)
        seeds.setdefault(fam, {})[depth] = len(rs)
        per_seed.setdefault(fam, {})[depth] = tops
        rows.append((fam, depth, len(rs), " ".join(r.label for r in rs),
                     " ".join("?" if r.seed is None else str(r.seed) for r in rs), float(np.mean(tops)),
                     " ".join(repr(t) for t in tops), "" if correct is None else correct,
                     "" if total is None else total, 100 * lo, 100 * hi,
                     "; ".join(sorted({r.val_images_source for r in rs}))))
    ax = pdepth.plot_accuracy_vs_depth(accs, intervals=cis, seeds=seeds, per_seed=per_seed)
    write_csv(stem.with_suffix(".csv"), ["family", "depth", "seeds", "models", "seed_values", "top1",
                                         "top1_per_seed", "correct", "images", "top1_ci_low", "top1_ci_high",
                                         "images_source"], rows)
    save_figure(ax.figure, stem, fmts)


def summary(runs: Sequence[ModelRun], stem: Path, threshold: float) -> None:
    """summary.csv: one row per checkpoint (and per untrained twin), from the verdict engine every command uses
    (``probing.verdict.judge``): 1-based block numbers, the count's 95% interval, the twin's count, the blocks
    collapsed beyond the twin and the regimes, under the reduction the figures were probed with."""
    rows = []
    for r in sorted(runs, key=family_order):
        for name, res, trained in _with_twins([r]):
            kind = trained.applied_kind if trained.applied_kind in res.attention else res.applied_kind
            st = res.attention[kind]
            vd = judge(res, Criterion.of(res, threshold=threshold), sweep_thresholds=None)
            other = vd.get("other_kind") or {}
            iv, base, beyond = vd["count_interval"] or ["", ""], vd["baseline"], vd["collapsed_beyond_twin"]
            feats = res.features is not None
            rows.append((name, vd["verdict"] if res is r.result else "", r.architecture, r.family, r.depth, kind,
                         res.images.count,
                         r.top1 if res is r.result else None, vd["criterion"]["reduction"], vd["count"], iv[0], iv[1],
                         vd["ratio"], " ".join(map(str, vd["similar_blocks"])),
                         "" if vd["onset"] is None else vd["onset"], "" if base is None else base["count"],
                         "" if beyond is None else " ".join(map(str, beyond)),
                         "; ".join(f"{k} {spans(v)}" for k, v in vd["regimes"].items() if v),
                         other.get("count", "") if other.get("kind") == "probs" else "",
                         float(np.nanmax(st.cross_head)), float(np.nanmean(st.cross_head)),
                         pfeat.feature_attention_correlation(res, kind) if feats else math.nan,
                         pfeat.feature_attention_partial_correlation(res, kind) if feats else math.nan))
    write_csv(stem, ["model", "verdict", "architecture", "family", "depth", "kind", "images", "top1", "reduction",
                     "similar_blocks", "count_ci_low", "count_ci_high", "ratio", "similar_block_numbers",
                     "all_similar_from_block", "twin_similar_blocks", "collapsed_beyond_twin", "regimes",
                     "similar_blocks_probs", "cross_head_max", "cross_head_mean", "feature_attention_r",
                     "feature_attention_partial_r"], rows)


@styled
def threshold_sweep(runs: Sequence[ModelRun], all_runs: Sequence[ModelRun], stem: Path, fmts: Sequence[str],
                    threshold: float) -> None:
    """Similar blocks against the block threshold (0.80-0.98), one row per map kind (``plots.kinds``), one column per
    reduction, each model beside its twin: how much the headline count depends on a free choice."""
    kinds = kinds_of([r.result for r in runs])
    sweeps = {k: {r.label: sweep(r.result, Criterion.of(r.result, threshold=threshold), k) for r in runs
                  if k in r.result.attention} for k in kinds}
    fig = new_figure((11.0, 3.0 * len(kinds) + 0.5))
    grid = fig.subplots(len(kinds), 2, squeeze=False)
    for row, kind in enumerate(kinds):
        named = {f"{r.label} ({kind_name(r.result, kind)})": r for r in runs if r.label in sweeps[kind]}
        colors = {name: _color(r, all_runs) for name, r in named.items()}
        curves = {name: sweeps[kind][r.label] for name, r in named.items()}
        for col, red in enumerate(("mean", "ratio")):
            ax = pdepth.plot_threshold_sweep(curves, red, colors=colors, kind=kind, ax=grid[row, col])
            ax.set_title(f"{PANEL_TITLES.get(kind, kind)}\n{red} reduction (a reading of the paper's)", fontsize=9)
            if col == 0 and ax.get_legend() is not None:  # the row's legend once, right of its last panel
                ax.get_legend().remove()
    rows = [(label, kind, r["threshold"], red, r[f"count_{red}"], "" if r[f"twin_count_{red}"] is None else
             r[f"twin_count_{red}"]) for kind in kinds for label, rs in sweeps[kind].items() for r in rs
            for red in ("mean", "ratio")]
    write_csv(stem.with_suffix(".csv"), ["model", "kind", "block_threshold", "reduction", "similar_blocks",
                                         "twin_similar_blocks"], rows)
    save_figure(fig, stem, fmts)


def measures(run: ModelRun, stem: Path, fmts: Sequence[str]) -> None:
    """The verdict's evidence per block (``plots.measures``), trained beside the untrained twin; CSV long format."""
    from ..plots.measures import PANELS, plot_measures_figure

    kind = pick_kind(run.result)
    axes = plot_measures_figure(run.result, kind, title=f"{run.label}: per-block measures ({kind}; grey dashed: "
                                "untrained twin)")
    rows = []
    for ax, (key, _) in zip(axes, PANELS):
        for line in ax.lines:
            who = {"trained": run.label, "untrained twin": twin(run.label)}.get(line.get_label(), line.get_label())
            rows += [(who, key, int(b), v) for b, v in zip(line.get_xdata(), line.get_ydata())]
    write_csv(stem.with_suffix(".csv"), ["model", "quantity", "block_number", "value"], rows)
    save_figure(axes[0].figure, stem, fmts)
