"""Shared fixtures: a small synthetic data set, built once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.sources import synthetic

    out = tmp_path_factory.mktemp("raw")
    config = synthetic.SyntheticConfig(n_users=400, n_items=300, n_impressions=12_000, n_days=7, seed=3)
    synthetic.write(synthetic.generate(config), out)
    return out


@pytest.fixture(scope="session")
def synthetic_manifest(synthetic_raw: Path, tmp_path_factory: pytest.TempPathFactory):
    from features import load_spec
    from pipelines.build import build

    return build(load_spec("synthetic"), synthetic_raw, tmp_path_factory.mktemp("ds") / "synthetic", progress=False)


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def census_dir() -> Path:
    return SHARED_DATA / "census-income"
