"""recsys-moe: multi-task ranking with Mixture-of-Experts on TorchRec.

The flow, one folder per layer: features (specs) → pipelines (Polars) → recsys_moe.model →
recsys_moe.training → recsys_moe.tracking (MLflow) → serving.
"""

__version__ = "0.1.0"
