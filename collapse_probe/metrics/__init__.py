"""Collapse metrics: pure functions (``functional``) and streaming accumulators (``streaming``; the companion
metrics in ``columns``, ``rows``, ``distance`` and ``cka``, all on the sums-and-rows base of ``sums``)."""
from .cka import CkaAccumulator
from .columns import ColumnAccumulator, matched_similarity
from .distance import DistanceAccumulator, patch_grid
from .functional import (
    column_cosine,
    cross_head_similarity,
    cross_layer_similarity,
    head_similarity_matrix,
    mean_off_diagonal,
    neighbor_similarity,
    normalize_columns,
    residual_norm_ratio,
    similar_blocks,
    similar_indices,
    singular_value_ranks,
    token_feature_similarity,
)
from .rows import RowAccumulator
from .streaming import (
    CrossHeadAccumulator,
    CrossLayerAccumulator,
    FeatureAccumulator,
    FindingsAccumulator,
    RankAccumulator,
    unit_columns,
)
from .sums import ImageSums, finite_images

__all__ = [
    "CkaAccumulator",
    "ColumnAccumulator",
    "CrossHeadAccumulator",
    "CrossLayerAccumulator",
    "DistanceAccumulator",
    "FeatureAccumulator",
    "FindingsAccumulator",
    "ImageSums",
    "RankAccumulator",
    "RowAccumulator",
    "column_cosine",
    "cross_head_similarity",
    "cross_layer_similarity",
    "finite_images",
    "head_similarity_matrix",
    "matched_similarity",
    "mean_off_diagonal",
    "neighbor_similarity",
    "normalize_columns",
    "patch_grid",
    "residual_norm_ratio",
    "similar_blocks",
    "similar_indices",
    "singular_value_ranks",
    "token_feature_similarity",
    "unit_columns",
]
