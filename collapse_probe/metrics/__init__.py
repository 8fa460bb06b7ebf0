"""Collapse metrics: pure functions (``functional``) and streaming accumulators (``streaming``)."""
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
    singular_value_ranks,
    token_feature_similarity,
)
from .streaming import (
    CrossHeadAccumulator,
    CrossLayerAccumulator,
    FeatureAccumulator,
    FindingsAccumulator,
    RankAccumulator,
    unit_columns,
)

__all__ = [
    "CrossHeadAccumulator", "CrossLayerAccumulator", "FeatureAccumulator", "FindingsAccumulator", "RankAccumulator",
    "column_cosine", "cross_head_similarity", "cross_layer_similarity", "head_similarity_matrix", "mean_off_diagonal",
    "neighbor_similarity", "normalize_columns", "residual_norm_ratio", "similar_blocks", "singular_value_ranks",
    "token_feature_similarity", "unit_columns",
]
