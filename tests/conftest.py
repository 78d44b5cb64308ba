"""Shared fixtures: a small synthetic data set, built once per test session."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

# Models logged here name no extra index for the CPU torch: this machine's pip configuration
# already provides the wheel, and PyTorch's index is not reachable from it (see
# recsys_moe/registry/environment.py; tests/test_mlflow_deploy.py checks the default).
os.environ.setdefault("RECSYS_MOE_TORCH_INDEX_URL", "")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recsys_moe.pipelines.sources import synthetic

    out = tmp_path_factory.mktemp("raw")
    config = synthetic.SyntheticConfig(n_users=400, n_items=300, n_impressions=12_000, n_days=7, seed=3)
    synthetic.write(synthetic.generate(config), out)
    return out


@pytest.fixture(scope="session")
def synthetic_manifest(synthetic_raw: Path, tmp_path_factory: pytest.TempPathFactory):
    from recsys_moe.features import load_spec
    from recsys_moe.pipelines.build import build

    return build(load_spec("synthetic"), synthetic_raw, tmp_path_factory.mktemp("ds") / "synthetic", progress=False)


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def census_dir() -> Path:
    return SHARED_DATA / "census-income"


@pytest.fixture(scope="session")
def registry_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty MLflow tracking store + registry (SQLite) for the session's registry tests."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"


def train_logged_model(manifest, store: str, workdir: Path, *overrides: str):  # type: ignore[no-untyped-def]
    """Train on `manifest`, tracked in `store`, and log the pyfunc → (TrainResult, model URI)."""
    from recsys_moe.config import load_config
    from recsys_moe.registry.package import log_model
    from recsys_moe.registry.promotion import read_holdout
    from recsys_moe.tracking.tracker import MlflowTracker
    from recsys_moe.training.trainer import train

    config = load_config(None, ["train.epochs=2", "model.num_experts=4", f"train.checkpoint_dir={workdir}", *overrides])
    tracker = MlflowTracker("registry-tests", uri=store)
    result = train(manifest, config, tracker=tracker, progress=False)
    tracker.close()
    example = read_holdout(manifest.raw_path("test")).head(5)
    return result, log_model(result.model_dir, result.run_id, example, tracking_uri=store)


@pytest.fixture(scope="session")
def logged_model(synthetic_manifest, registry_store: str, tmp_path_factory: pytest.TempPathFactory):
    """A model trained for two epochs on the synthetic set and logged as a pyfunc."""
    return train_logged_model(synthetic_manifest, registry_store, tmp_path_factory.mktemp("run"))
