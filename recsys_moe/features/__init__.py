"""Declarative feature specs: what the raw columns mean and which tasks the model predicts."""

from recsys_moe.features.spec import (
    BUNDLED_SPECS,
    DatasetSource,
    Feature,
    FeatureSpec,
    SpecError,
    Task,
    VocabPolicy,
    load_spec,
)

__all__ = ["BUNDLED_SPECS", "DatasetSource", "Feature", "FeatureSpec", "SpecError", "Task", "VocabPolicy", "load_spec"]
