"""Specs with only dense or only sparse inputs: the pipeline, training, batch scoring and the
HTTP endpoint all work, and give the same scores (a spec of one kind of input is a normal first
spec on new data, not an edge case)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import yaml

from recsys_moe.config import load_config
from recsys_moe.features import load_spec
from recsys_moe.pipelines.build import build
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.scoring import Scorer
from recsys_moe.scoring.batch import score_parquet
from recsys_moe.serving.app import create_app
from recsys_moe.serving.settings import ServingSettings
from recsys_moe.training.trainer import train
from tests.test_serving import serve

DENSE = [
    {"name": "position", "kind": "dense", "transform": "standardize", "min": 1},
    {"name": "price", "kind": "dense", "transform": "log1p", "min": 0},
    {"name": "age", "kind": "dense", "transform": "standardize", "min": 0, "max": 130},
    {"name": "item_age_days", "kind": "dense", "transform": "log1p", "min": 0},
]
SPARSE = [
    {"name": "user", "column": "user_id", "kind": "categorical", "embedding_dim": 8},
    {"name": "item", "column": "item_id", "kind": "categorical", "embedding_dim": 8},
    {"name": "brand", "kind": "categorical", "embedding_dim": 4, "vocab": {"kind": "hash", "buckets": 64}},
    {"name": "interests", "kind": "multi_hot", "embedding_dim": 4, "pooling": "mean", "max_length": 8},
    {
        "name": "age_bucket",
        "column": "age",
        "kind": "dense",
        "transform": "bucketize",
        "num_buckets": 5,
        "embedding_dim": 4,
    },
]


@pytest.mark.parametrize(("kind", "features"), [("dense_only", DENSE), ("sparse_only", SPARSE)])
@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_one_kind_of_input_trains_scores_and_serves(
    kind: str, features: list[dict], arch: str, synthetic_raw: Path, tmp_path: Path
) -> None:
    base = load_spec("synthetic").model_dump(mode="json", exclude_none=True)
    spec_path = tmp_path / f"{kind}.yaml"
    spec_path.write_text(yaml.safe_dump({**base, "name": kind, "features": features, "history": None}))
    manifest = build(load_spec(spec_path), synthetic_raw, tmp_path / "ds", progress=False)
    assert (len(manifest.dense_features) == 0) == (kind == "sparse_only")
    assert (len(manifest.sparse_features) == 0) == (kind == "dense_only")

    config = load_config(
        None,
        ["train.epochs=2", f"model.arch={arch}", "model.num_experts=3", f"train.checkpoint_dir={tmp_path / 'run'}"],
    )
    result = train(manifest, config, progress=False)
    for task in ("click", "conversion"):
        assert 0.4 < result.test.metrics[task]["auc"] <= 1.0

    holdout = read_holdout(manifest.raw_path("test")).head(50)
    scorer = Scorer(result.model_dir)
    source, out = tmp_path / "rows.parquet", tmp_path / "scores.parquet"
    holdout.write_parquet(source)
    report = score_parquet(scorer, source, out, chunk_rows=16, progress=False)
    assert report.rows_out == 50
    batch = pl.read_parquet(out).select(scorer.tasks).to_numpy()
    np.testing.assert_allclose(batch, result.test.scores.numpy()[:50], rtol=0, atol=1e-5)

    rows = holdout.select(scorer.input_columns).to_dicts()
    app = create_app(ServingSettings(model_dir=result.model_dir))
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/v1/score", json={"rows": rows})
        assert response.status_code == 200, response.text
        scores = np.array([[s[t] for t in scorer.tasks] for s in response.json()["scores"]])
        np.testing.assert_allclose(scores, batch, rtol=0, atol=1e-5)
        field = "position" if kind == "dense_only" else "interests"
        bad = http.post("/v1/score", json={"rows": [rows[0], {**rows[1], field: {"not": "a value"}}]})
        assert bad.status_code == 422 and field in bad.text, bad.text
        assert http.post("/v1/score", json={"rows": rows[:2]}).status_code == 200  # and it keeps serving
