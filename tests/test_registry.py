"""The promotion gate, rollback, listing and batch scoring from the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_moe.cli import main
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry.promotion import PromotionConfig, decide, read_holdout
from recsys_moe.registry.versions import Registry, RegistryError
from recsys_moe.scoring import Scorer
from tests.conftest import train_logged_model


def test_decide_needs_every_metric_to_hold() -> None:
    config = PromotionConfig(tolerance=0.002)
    metrics = ["a.auc", "b.auc"]
    assert decide({"a.auc": 0.8, "b.auc": 0.7}, None, metrics, config)[0]
    assert decide({"a.auc": 0.81, "b.auc": 0.7}, {"a.auc": 0.8, "b.auc": 0.7}, metrics, config)[0]
    # A big gain on one task does not buy a regression on another (no single-task selection).
    ok, reason = decide({"a.auc": 0.9, "b.auc": 0.69}, {"a.auc": 0.8, "b.auc": 0.7}, metrics, config)
    assert not ok and "b.auc is worse" in reason
    assert not decide({"a.auc": 0.8, "b.auc": 0.7}, {"a.auc": 0.8, "b.auc": 0.7}, metrics, config)[0]  # a tie
    assert not decide(
        {"a.auc": 0.805, "b.auc": 0.7}, {"a.auc": 0.8, "b.auc": 0.7}, metrics, PromotionConfig(margin=0.01)
    )[0]
    assert decide({"m.mse": 1.0}, {"m.mse": 1.5}, ["m.mse"], config)[0]  # lower is better for mse


def test_gate_promotes_better_not_worse_and_rollback_restores(
    synthetic_manifest: Manifest,
    logged_model,
    registry_store: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_store)
    registry, name = Registry(registry_store), "gate-test"
    holdout = read_holdout(synthetic_manifest.raw_path("test"))
    weak = ("train.epochs=1", "train.max_steps_per_epoch=1")
    _, baseline_uri = train_logged_model(synthetic_manifest, registry_store, tmp_path / "a", *weak)
    _, better_uri = logged_model
    _, worse_uri = train_logged_model(synthetic_manifest, registry_store, tmp_path / "c", *weak, "train.seed=7")

    v1 = registry.register(baseline_uri, name)
    assert registry.gate(name, v1, holdout, PromotionConfig()).promote  # the first model: no champion yet
    v2 = registry.register(better_uri, name)
    better = registry.gate(name, v2, holdout, PromotionConfig())
    assert better.promote, better.reason
    assert all(better.candidate[m] > better.champion[m] for m in ("click.auc", "conversion.auc"))
    v3 = registry.register(worse_uri, name)
    worse = registry.gate(name, v3, holdout, PromotionConfig())
    assert not worse.promote and "worse" in worse.reason
    assert registry.alias_version(name, "champion") == v2 and registry.alias_version(name, "challenger") == v3
    tags = registry.client.get_model_version(name, v3).tags
    assert tags["gate.decision"] == "not promoted" and tags["gate.champion_version"] == v2
    assert float(tags["gate.candidate.click.auc"]) == pytest.approx(worse.candidate["click.auc"], abs=1e-6)

    assert main(["models", name]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "challenger" in listing and "click.auc" in listing

    assert main(["rollback", name]) == 0
    assert registry.alias_version(name, "champion") == v1
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback(name)


def test_batch_scoring_from_the_registry(
    synthetic_manifest: Manifest, logged_model, registry_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_store)
    result, model_uri = logged_model
    registry = Registry(registry_store)
    version = registry.register(model_uri, "batch-test")
    registry.client.set_registered_model_alias("batch-test", "champion", version)

    rows = read_holdout(synthetic_manifest.raw_path("test"))
    bad = rows.head(3).with_columns(pl.Series("price", [-1.0, 2.0, None]), pl.Series("age", [20, 999, 30]))
    source = tmp_path / "in"
    source.mkdir()
    rows.write_parquet(source / "a.parquet")
    bad.write_parquet(source / "b.parquet")
    out = tmp_path / "scores.parquet"
    assert (
        main(
            [
                "score",
                "--model",
                "models:/batch-test@champion",
                "--input",
                str(source),
                "--output",
                str(out),
                "--chunk-rows",
                "500",
                "--weight",
                "conversion=4",
            ]
        )
        == 0
    )

    scores = pl.read_parquet(out)
    rejects = pl.read_parquet(tmp_path / "scores.rejects.parquet")
    assert scores.height + rejects.height == rows.height + bad.height
    assert rejects["_row"].to_list() == [rows.height, rows.height + 1]
    assert rejects["_reject_reason"].to_list() == [
        "price: -1.0 is below the minimum 0.0",
        "age: 999.0 is above the maximum 130.0",
    ]
    assert scores.columns == ["impression_id", "user_id", "item_id", "click", "conversion", "score"]
    head = scores.head(rows.height)
    np.testing.assert_allclose(head.select("click", "conversion").to_numpy(), result.test.scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(head["score"], head["click"] + 4 * head["conversion"], rtol=1e-6)
    assert head["impression_id"].to_list() == rows["impression_id"].to_list()
    # The same rows through the bundle directly.
    direct = Scorer(result.model_dir).score(rows)
    np.testing.assert_allclose(head.select("click", "conversion").to_numpy(), direct.scores, atol=1e-6)


def test_model_cache_is_keyed_by_the_logged_model_not_name_and_version(
    synthetic_manifest: Manifest, logged_model, registry_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stores can both hold `ranker` v1; the download cache must not hand one store's model
    to the other (found when a demo in a second checkout scored the first checkout's model)."""
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    other_store = f"sqlite:///{tmp_path / 'other.db'}"
    _, other_uri = train_logged_model(synthetic_manifest, other_store, tmp_path / "other", "train.seed=5")
    a, b = Registry(registry_store), Registry(other_store)
    a.register(logged_model[1], "same-name")
    b.register(other_uri, "same-name")
    assert a.bundle("same-name", "1") != b.bundle("same-name", "1")
    rows = read_holdout(synthetic_manifest.raw_path("test")).head(20)
    assert not np.allclose(a.scorer("same-name", "1").score(rows).scores, b.scorer("same-name", "1").score(rows).scores)


def test_the_gate_can_require_beating_the_runs_baselines(
    synthetic_manifest: Manifest, logged_model, registry_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With promotion.beat_baselines_by the gate also reads the candidate's run: its test metrics
    against the baselines fitted in the same run (training.baselines), on the same rows."""
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    registry = Registry(registry_store)
    holdout = read_holdout(synthetic_manifest.raw_path("test"))
    result, uri = logged_model
    run = {b["name"]: b["test"]["click"]["auc"] for b in result.baselines}
    gap = result.test.metrics["click"]["auc"] - max(run.values())
    easy, hard = (
        PromotionConfig(metrics=["click.auc"], beat_baselines_by=gap - 0.001),
        PromotionConfig(metrics=["click.auc"], beat_baselines_by=gap + 0.001),
    )
    name = "baseline-gate"
    version = registry.register(uri, name)
    refused = registry.gate(name, version, holdout, hard)
    assert not refused.promote and "does not beat its baselines" in refused.reason
    assert max(run, key=run.__getitem__) in refused.reason
    promoted = registry.gate(name, version, holdout, easy)
    assert promoted.promote, promoted.reason


def test_baseline_shortfall_reads_direction_and_absence() -> None:
    from recsys_moe.registry.promotion import baseline_shortfall

    logged = {"test_a_logloss": 0.40, "baseline_linear_test_a_logloss": 0.45, "baseline_key_mean_test_a_logloss": 0.41}
    assert baseline_shortfall(logged, ["a.logloss"], 0.0) is None  # lower is better
    assert "key_mean" in (baseline_shortfall(logged, ["a.logloss"], 0.02) or "")
    assert "no test a.auc" in (baseline_shortfall(logged, ["a.auc"], 0.0) or "")
