"""Plots of collapse-probe results (never of models): the analyses of the DeepViT paper for any checkpoints.

    from collapse_probe.plots import plot_neighbor_similarity, save_figure
    ax = plot_neighbor_similarity({"my_vit": result})        # result: collapse_probe.results.ProbeResult
    save_figure(ax.figure, "out/fig3a")                       # out/fig3a.png + out/fig3a.pdf

Every function takes results, accepts ``ax=None`` (or ``axes=None`` for multi-panel figures), returns what it drew
on and never calls ``show()``. ``collapse_probe.figures.make_figures`` renders all of them from checkpoints.

| function                      | paper figure                                          |
|-------------------------------|-------------------------------------------------------|
| plot_neighbor_similarity      | Fig. 3(a) (one axis, one map kind)                    |
| plot_neighbor_similarity_by_kind | Fig. 3(a) / Fig. 8 ViT vs DeepViT, one panel per kind |
| plot_similar_blocks           | Fig. 3(b) (our models, one map kind per axes)         |
| plot_paper_similar_blocks     | Fig. 3(b): the paper's ImageNet counts, own axes      |
| plot_cross_head (_by_kind)    | Fig. 3(c)                                             |
| plot_feature_figure (+ parts) | Fig. 4 (Pearson r and partial r given block)          |
| plot_attention_maps           | Fig. 8 attention-map grids (one scale, colour bar)    |
| plot_head_maps                | Fig. 8: single heads of one image ("mixed" maps)      |
| plot_theta, plot_theta_change | Fig. 8-style heatmaps of Theta; final vs init         |
| plot_accuracy_vs_depth        | Fig. 1 (Wilson intervals, seed counts)                |
| plot_similarity_heatmap       | L x L attention similarity                            |

Untrained baselines ("untrained twin") are drawn grey dashed (hollow grey markers in Fig. 3(b)) where a
``baseline`` / ``baselines`` argument is given. ``plots.kinds`` holds the rule every figure follows for the two map
kinds (softmax maps, maps after Re-attention): separate panels, thresholds on softmax panels only, one colour scale
with a colour bar per map grid; ``plots.style`` puts legends off the data and numbers blocks from 1.
"""
from .data import MeanMaps, ThetaWeights, pick_kind
from .depth import (
    PAPER_SIMILAR_BLOCKS,
    PAPER_SIMILAR_BLOCKS_DEEPVIT,
    plot_accuracy_vs_depth,
    plot_paper_similar_blocks,
    plot_similar_blocks,
    similar_block_points,
    wilson_interval,
)
from .features import (
    feature_attention_correlation,
    feature_attention_partial_correlation,
    feature_vs_last,
    plot_attention_vs_features,
    plot_feature_figure,
    plot_feature_heatmap,
    plot_feature_vs_last,
)
from .maps import plot_attention_maps, plot_head_maps, plot_theta, plot_theta_change
from .similarity import (
    plot_cross_head,
    plot_cross_head_by_kind,
    plot_neighbor_similarity,
    plot_neighbor_similarity_by_kind,
    plot_similarity_heatmap,
)
from .style import STYLE, save_figure, styled, write_csv

__all__ = [
    "PAPER_SIMILAR_BLOCKS", "PAPER_SIMILAR_BLOCKS_DEEPVIT", "STYLE", "MeanMaps", "ThetaWeights",
    "feature_attention_correlation", "feature_attention_partial_correlation", "feature_vs_last", "pick_kind",
    "plot_accuracy_vs_depth", "plot_attention_maps", "plot_attention_vs_features", "plot_cross_head",
    "plot_cross_head_by_kind",
    "plot_feature_figure", "plot_feature_heatmap", "plot_feature_vs_last", "plot_head_maps",
    "plot_neighbor_similarity", "plot_neighbor_similarity_by_kind", "plot_paper_similar_blocks",
    "plot_similar_blocks", "plot_similarity_heatmap", "plot_theta", "plot_theta_change", "save_figure",
    "similar_block_points", "styled", "wilson_interval", "write_csv",
]
