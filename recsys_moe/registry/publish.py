"""After training: log the model as a pyfunc and, optionally, register it and run the gate.

One function so that `recsys-moe train --register`, the demo and the Airflow DAG publish models
the same way: the holdout is always the dataset's raw test rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry.package import log_model
from recsys_moe.registry.promotion import Decision, PromotionConfig, read_holdout
from recsys_moe.registry.versions import Registry
from recsys_moe.training.loop import TrainResult


@dataclass
class Registered:
    name: str
    version: str
    decision: Decision  # the gate's, already applied to the aliases


@dataclass
class Published:
    model_uri: str  # the logged pyfunc
    registered: Registered | None = None  # when it was registered (and gated)


def publish(
    result: TrainResult,
    manifest: Manifest,
    register_as: str | None = None,
    promotion: PromotionConfig | None = None,
    tracking_uri: str | None = None,
) -> Published:
    if result.run_id is None:
        raise ValueError("publishing needs a tracked run (tracking is disabled)")
    holdout = read_holdout(manifest.raw_path("test"))
    model_uri = log_model(result.model_dir, result.run_id, holdout.head(5), tracking_uri=tracking_uri)
    if register_as is None:
        return Published(model_uri)
    registry = Registry(tracking_uri)
    version = registry.register(model_uri, register_as, tags={"run_id": result.run_id})
    decision = registry.gate(register_as, version, holdout, promotion or PromotionConfig())
    return Published(model_uri, Registered(register_as, version, decision))
