"""One scoring path: the trainer's evaluation, the bundle scorer and the MLflow pyfunc agree."""

from __future__ import annotations

import mlflow
import numpy as np
import polars as pl
import pytest

from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.pipelines.validate import SchemaError
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.scoring import RankingConfig, Scorer, ranking_score


def test_bundle_scores_raw_rows_like_trainer_evaluation(synthetic_manifest: Manifest, logged_model) -> None:
    result, _ = logged_model
    holdout = read_holdout(synthetic_manifest.raw_path("test"))
    scored = Scorer(result.model_dir).score(holdout)
    assert scored.rejects.height == 0 and len(scored.rows) == holdout.height
    np.testing.assert_allclose(scored.scores, result.test.scores.numpy(), rtol=0, atol=1e-5)
    assert scored.keys.columns == ["impression_id", "user_id", "item_id"]


def test_bad_rows_are_rejected_with_field_and_row_not_raised(synthetic_manifest: Manifest, logged_model) -> None:
    result, _ = logged_model
    rows = read_holdout(synthetic_manifest.raw_path("test")).head(4)
    rows = rows.with_columns(pl.Series("age", [30.0, -5.0, 40.0, 200.0]))
    scored = Scorer(result.model_dir).score(rows)
    assert scored.rows.tolist() == [0, 2]
    assert scored.rejects["_row"].to_list() == [1, 3]
    assert scored.rejects["_reject_reason"][0] == "age: -5.0 is below the minimum 0.0"
    with pytest.raises(SchemaError, match="price"):
        Scorer(result.model_dir).score(rows.drop("price"))


def test_unseen_categories_score_as_oov(synthetic_manifest: Manifest, logged_model) -> None:
    result, _ = logged_model
    rows = read_holdout(synthetic_manifest.raw_path("test")).head(3)
    unseen = rows.with_columns(pl.lit("never-seen-item").alias("item_id"), pl.lit(None, pl.String).alias("country"))
    scored = Scorer(result.model_dir).score(unseen)
    assert scored.rejects.height == 0 and np.isfinite(scored.scores).all()


def test_pyfunc_loads_without_pickles_and_matches(synthetic_manifest: Manifest, logged_model, registry_store) -> None:
    result, model_uri = logged_model
    mlflow.set_tracking_uri(registry_store)
    model = mlflow.pyfunc.load_model(model_uri)
    holdout = read_holdout(synthetic_manifest.raw_path("test")).head(50)
    out = model.predict(holdout.to_pandas())
    assert list(out.columns) == ["click", "conversion"]
    np.testing.assert_allclose(out.to_numpy(), result.test.scores.numpy()[:50], rtol=0, atol=1e-5)
    local = mlflow.artifacts.download_artifacts(model_uri)
    from pathlib import Path

    assert not list(Path(local).rglob("*.pkl")) and not list(Path(local).rglob("*.pt"))


def test_ranking_score_combines_tasks() -> None:
    s = np.array([[0.5, 0.1], [0.2, 0.4]])
    np.testing.assert_allclose(ranking_score(s, ["a", "b"], RankingConfig()), [0.6, 0.6])
    np.testing.assert_allclose(ranking_score(s, ["a", "b"], RankingConfig(weights={"b": 2})), [0.7, 1.0])
    np.testing.assert_allclose(ranking_score(s, ["a", "b"], RankingConfig(kind="weighted_product")), [0.05, 0.08])
    with pytest.raises(ValueError, match="unknown tasks"):
        ranking_score(s, ["a", "b"], RankingConfig(weights={"c": 1}))


def test_a_large_frame_is_checked_and_scored_like_its_slices(synthetic_manifest: Manifest, logged_model) -> None:
    """From LAZY_ROWS rows validation runs as one planned query (a batch chunk), below it eagerly
    (a request): both give the same rejects, in the same words, and the same scores."""
    from recsys_moe.scoring.scorer import LAZY_ROWS

    result, _ = logged_model
    holdout = read_holdout(synthetic_manifest.raw_path("test"))
    rows = pl.concat([holdout] * -(-3 * LAZY_ROWS // holdout.height)).head(3 * LAZY_ROWS)
    bad = {7: ("age", -5.0), 100: ("age", float("nan")), 2500: ("price", float("inf")), 4000: ("age", 200.0)}
    rows = rows.with_columns(
        pl.Series(c, [bad[i][1] if bad.get(i, ("",))[0] == c else v for i, v in enumerate(rows[c])], pl.Float64)
        for c in ("age", "price")
    )
    scorer = Scorer(result.model_dir)
    whole = scorer.score(rows)
    step = LAZY_ROWS // 4
    parts = [scorer.score(rows.slice(s, step)) for s in range(0, rows.height, step)]
    assert sorted(whole.rejects["_row"].to_list()) == sorted(bad)
    reasons = [r for p in parts for r in p.rejects["_reject_reason"].to_list()]
    assert whole.rejects["_reject_reason"].to_list() == reasons
    assert whole.rows.tolist() == [s + r for s, p in zip(range(0, rows.height, step), parts) for r in p.rows]
    np.testing.assert_allclose(whole.scores, np.concatenate([p.scores for p in parts]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("height", [300, 3000])  # eager (a request) and planned (a batch chunk)
def test_one_pass_check_is_validate_then_encode(synthetic_manifest: Manifest, logged_model, height: int) -> None:
    """`Scorer.score` validates and casts in one pass (`checked`): the same rows, rejects, reasons
    and scores as the two steps `validate` then `encode`, bit for bit, with or without key columns."""
    result, _ = logged_model
    holdout = read_holdout(synthetic_manifest.raw_path("test"))
    rows = pl.concat([holdout] * -(-height // holdout.height)).head(height)
    age = rows["age"].to_list()
    age[5], age[height - 1] = -5.0, float("nan")
    rows = rows.with_columns(pl.Series("age", age, pl.Float64), pl.lit("not-a-price").alias("price"))
    rows = rows.with_columns(pl.when(pl.int_range(pl.len()) % 7 == 0).then(pl.col("price")).otherwise(pl.lit("2.5")))
    scorer = Scorer(result.model_dir)
    for frame in (rows, rows.drop("impression_id")):
        valid, rejects = scorer.validate(frame)
        typed, checked_rejects = scorer.checked(frame)
        assert checked_rejects.equals(rejects) and rejects.height > 2
        assert typed.drop("_row").with_columns(scorer._encoders).equals(scorer.encode(valid))
        assert typed["_row"].equals(valid["_row"])
        scored = scorer.score(frame)
        assert np.array_equal(scored.scores, scorer.predict_encoded(scorer.encode(valid)))
        assert scored.rows.tolist() == valid["_row"].to_list()
        assert scored.keys.columns == [k for k in ("impression_id", "user_id", "item_id") if k in frame.columns]
