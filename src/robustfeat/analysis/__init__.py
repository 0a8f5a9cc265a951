"""The paper's analyses (sections 4.3 and 4.4: Figures 2, 3, 4 and Table 4).

    measures   pure functions of models and tensors (re-exported here)
    pipeline   one function per analysis on run directories, shared by ``robustfeat analyze`` and
               ``robustfeat reproduce``, and the files ``analyze`` writes
    figures    the matplotlib figures (PNG)
"""

from .measures import (
    CLIP_STD,
    VARIANTS,
    AnalysisError,
    RankAccumulator,
    RankAverage,
    analysis_attack,
    attention_maps,
    attention_vs_robustness,
    classify_maps,
    clip_std,
    feature_robustness,
    gradient_map_accuracy,
    gradient_maps,
    pick_examples,
    prepare_maps,
    rankdata,
    require_attention,
    rescale_unit,
    robustness_order,
    spearman,
    subset,
    untrained_control,
    upsample_map,
    weights_by_rank,
)

__all__ = [
    "CLIP_STD",
    "VARIANTS",
    "AnalysisError",
    "RankAccumulator",
    "RankAverage",
    "analysis_attack",
    "attention_maps",
    "attention_vs_robustness",
    "classify_maps",
    "clip_std",
    "feature_robustness",
    "gradient_map_accuracy",
    "gradient_maps",
    "pick_examples",
    "prepare_maps",
    "rankdata",
    "require_attention",
    "rescale_unit",
    "robustness_order",
    "spearman",
    "subset",
    "untrained_control",
    "upsample_map",
    "weights_by_rank",
]
