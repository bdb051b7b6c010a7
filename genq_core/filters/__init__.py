"""Filters that pick a calibration set from generated images.

Entry point: :func:`apply_filters` with a :class:`FilterConfig`, returning a
:class:`FilterReport`. One algorithm per module: ``energy`` (free energy and label agreement under
the float classifier), ``bn`` (leave-one-out BatchNorm-statistics sensitivity), ``patch``
(patch-similarity entropy for ViTs), ``clip`` (open_clip image-text score), ``select`` (per-class
quotas and the chain).
"""

from genq_core.filters._common import FilterCanceled
from genq_core.filters.bn import bn_distance, bn_sensitivity, has_batchnorm
from genq_core.filters.clip import ClipImages, ClipModel, clip_scores, load_clip
from genq_core.filters.energy import (
    classifier_logits,
    energy_from_logits,
    energy_scores,
    label_agreement,
)
from genq_core.filters.patch import TRANSFORMER_BLOCK_TYPES, is_vit_like, patch_similarity_entropy
from genq_core.filters.select import (
    ORDERED_FILTERS,
    FilterConfig,
    FilterReport,
    FilterResult,
    apply_filters,
    keep_per_class,
)

__all__ = [
    "ORDERED_FILTERS",
    "TRANSFORMER_BLOCK_TYPES",
    "ClipImages",
    "ClipModel",
    "FilterCanceled",
    "FilterConfig",
    "FilterReport",
    "FilterResult",
    "apply_filters",
    "bn_distance",
    "bn_sensitivity",
    "classifier_logits",
    "clip_scores",
    "energy_from_logits",
    "energy_scores",
    "has_batchnorm",
    "is_vit_like",
    "keep_per_class",
    "label_agreement",
    "load_clip",
    "patch_similarity_entropy",
]
