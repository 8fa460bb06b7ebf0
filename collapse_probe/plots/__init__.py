"""Plots of collapse-probe results (never of models): the analyses of the DeepViT paper for any checkpoints.

    from collapse_probe.plots import plot_neighbor_similarity, save_figure
    ax = plot_neighbor_similarity({"my_vit": result})        # result: collapse_probe.results.ProbeResult
    save_figure(ax.figure, "out/fig3a")                       # out/fig3a.png + out/fig3a.pdf

Every function takes results, accepts ``ax=None`` (or ``axes=None`` for multi-panel figures), returns what it drew
on and never calls ``show()``. ``collapse_probe.figures.make_figures`` renders all of them from checkpoints.

| function                      | paper figure                                          |
|-------------------------------|-------------------------------------------------------|
| plot_neighbor_similarity      | Fig. 3(a); Fig. 8 ViT vs DeepViT (pass both models)   |
| plot_similar_blocks           | Fig. 3(b)                                             |
| plot_cross_head               | Fig. 3(c)                                             |
| plot_feature_figure (+ parts) | Fig. 4                                                |
| plot_attention_maps           | Fig. 8 attention-map grids                            |
| plot_theta                    | Fig. 8-style heatmaps of the learned Theta            |
| plot_accuracy_vs_depth        | Fig. 1                                                |
| plot_similarity_heatmap       | L x L attention similarity                            |
"""
from .data import MeanMaps, ThetaWeights, pick_kind
from .depth import PAPER_SIMILAR_BLOCKS, plot_accuracy_vs_depth, plot_similar_blocks, similar_block_points
from .features import (
    feature_attention_correlation,
    feature_vs_last,
    plot_attention_vs_features,
    plot_feature_figure,
    plot_feature_heatmap,
    plot_feature_vs_last,
)
from .maps import plot_attention_maps, plot_theta
from .similarity import plot_cross_head, plot_neighbor_similarity, plot_similarity_heatmap
from .style import STYLE, save_figure, styled, write_csv

__all__ = [
    "MeanMaps", "ThetaWeights", "pick_kind", "PAPER_SIMILAR_BLOCKS", "plot_accuracy_vs_depth", "plot_similar_blocks",
    "similar_block_points", "feature_attention_correlation", "feature_vs_last", "plot_attention_vs_features",
    "plot_feature_figure", "plot_feature_heatmap", "plot_feature_vs_last", "plot_attention_maps", "plot_theta",
    "plot_cross_head", "plot_neighbor_similarity", "plot_similarity_heatmap", "STYLE", "save_figure", "styled",
    "write_csv",
]
