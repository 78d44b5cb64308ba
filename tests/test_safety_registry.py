"""Nothing wrong promoted, a registry that stays consistent (issue 13, findings 3, 4, 5, 9, 10)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from recsys_moe.cli import main
from recsys_moe.features import load_spec
from recsys_moe.pipelines.build import build
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry.promotion import CHAMPION, PREVIOUS, PromotionConfig, evaluate_candidate, read_holdout
from recsys_moe.registry.versions import Registry, RegistryError, StaleDecisionError
from recsys_moe.scoring import Scorer
from tests.conftest import train_logged_model

WEAK = ("train.epochs=1", "train.max_steps_per_epoch=2")


@pytest.fixture(scope="module")
def holdout(synthetic_manifest: Manifest) -> pl.DataFrame:
    return read_holdout(synthetic_manifest.raw_path("test"))


@pytest.fixture
def registry(registry_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_store)
    return Registry(registry_store)


# -- finding 3: a model with other tasks (or another input) does not replace the champion --------
def test_a_candidate_with_fewer_tasks_is_not_promoted(
    synthetic_manifest: Manifest, logged_model, registry: Registry, registry_store: str, holdout, tmp_path: Path
) -> None:
    name = "fewer-tasks"
    champion = registry.register(logged_model[1], name)
    registry.gate(name, champion, holdout, PromotionConfig())
    _, uri = train_logged_model(
        synthetic_manifest, registry_store, tmp_path / "st", "model.arch=single_task", "train.tasks=[click]"
    )
    candidate = registry.register(uri, name)
    decision = registry.gate(name, candidate, holdout, PromotionConfig(tolerance=1.0))
    assert not decision.promote and "its clients would lose" in decision.reason
    assert registry.alias_version(name, CHAMPION) == champion
    forced = registry.gate(name, candidate, holdout, PromotionConfig(), force=True)  # explicit, and recorded
    assert forced.promote and registry.client.get_model_version(name, candidate).tags["gate.forced"] == "true"


def test_a_candidate_reading_its_input_differently_is_not_comparable(
    synthetic_raw: Path, logged_model, holdout: pl.DataFrame, tmp_path: Path
) -> None:
    from recsys_moe.features.spec import parse_spec
    from recsys_moe.registry.promotion import compatible

    raw = load_spec("synthetic").model_dump(mode="json")
    for f in raw["features"]:
        if f["name"] == "interests":
            f["kind"], f["vocab"], f["embedding_dim"] = "categorical", None, 8  # a list read as one id
    raw["features"] = [f for f in raw["features"] if f["name"] != "interests"]
    manifest = build(parse_spec(raw), synthetic_raw, tmp_path / "ds", progress=False)
    result, _ = train_logged_model(manifest, f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "run", *WEAK)
    why = compatible(Scorer(result.model_dir), Scorer(logged_model[0].model_dir))
    assert why is not None and "interests" in why


# -- finding 4: both models are measured on the same rows -----------------------------------------
def test_the_gate_compares_on_the_rows_both_models_accept(
    synthetic_raw: Path, logged_model, holdout: pl.DataFrame, tmp_path: Path
) -> None:
    from recsys_moe.features.spec import parse_spec

    raw = load_spec("synthetic").model_dump(mode="json")
    for f in raw["features"]:
        if f["name"] == "price":
            f["max"] = 20.0  # this model's contract refuses most of the holdout's prices
    manifest = build(parse_spec(raw), synthetic_raw, tmp_path / "ds", max_reject_rate=1.0, progress=False)
    result, _ = train_logged_model(manifest, f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "run", *WEAK)
    narrow, champion = Scorer(result.model_dir), Scorer(logged_model[0].model_dir)
    assert narrow.score(holdout).rejects.height > holdout.height // 4
    decision = evaluate_candidate(narrow, champion, holdout, PromotionConfig(tolerance=1.0))
    assert not decision.promote and "rejects" in decision.reason and "price" in decision.reason
    # Allowed to reject those rows, it is still measured only where both score.
    lenient = PromotionConfig(tolerance=1.0, max_extra_rejects=1.0)
    decision = evaluate_candidate(narrow, champion, holdout, lenient)
    assert decision.rows == narrow.score(holdout).rows.size < holdout.height


# -- finding 9: no promotion without evidence -----------------------------------------------------
def test_no_promotion_without_evidence(logged_model, holdout: pl.DataFrame) -> None:
    scorer = Scorer(logged_model[0].model_dir)
    config = PromotionConfig()
    empty = evaluate_candidate(scorer, None, holdout.head(0), config)
    assert not empty.promote and "only 0 holdout rows" in empty.reason
    rejected = evaluate_candidate(scorer, None, holdout.with_columns(pl.lit(-1.0).alias("price")), config)
    assert not rejected.promote and "only 0 holdout rows" in rejected.reason
    one_class = evaluate_candidate(scorer, None, holdout.with_columns(pl.lit(0).alias("click")), config)
    assert not one_class.promote and "single class" in one_class.reason
    bad_labels = holdout.with_columns(pl.lit(2).alias("conversion"))  # not 0/1: every row's label is invalid
    assert not evaluate_candidate(scorer, None, bad_labels, config).promote
    assert evaluate_candidate(scorer, None, holdout, config).promote  # enough, valid, both classes


# -- finding 5: concurrent promotions, and recovery from a broken champion -------------------------
WORKER = textwrap.dedent(
    """
    import json, sys
    import polars as pl
    from recsys_moe.registry.promotion import PromotionConfig
    from recsys_moe.registry.versions import Registry, StaleDecisionError
    store, name, uri, holdout, rounds = sys.argv[1:6]
    registry, rows, won = Registry(store), pl.read_parquet(holdout), []
    for _ in range(int(rounds)):
        version = registry.register(uri, name)
        try:
            registry.gate(name, version, rows, PromotionConfig(), force=True)
            won.append(version)
        except StaleDecisionError:
            pass
    print("WON " + json.dumps(won))
    """
)


def test_concurrent_promotions_keep_the_registry_consistent(
    synthetic_manifest: Manifest, holdout: pl.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes register and promote new versions of one model at once, round after round:
    exactly one champion, a previous-champion chain holding every promotion either process was
    told succeeded (and no other), and rollback walks it back."""
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    store = f"sqlite:///{tmp_path / 'race.db'}"
    _, uri = train_logged_model(synthetic_manifest, store, tmp_path / "run", *WEAK)
    holdout.head(300).write_parquet(tmp_path / "holdout.parquet")
    name, registry = "race", Registry(store)
    first = registry.register(uri, name)
    registry.gate(name, first, holdout.head(300), PromotionConfig(), force=True)
    args = [store, name, uri, str(tmp_path / "holdout.parquet"), "6"]
    env = {**os.environ, "RECSYS_MOE_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    won = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        won += json.loads(next(line for line in out.splitlines() if line.startswith("WON "))[4:])
    champion = registry.alias_version(name, CHAMPION)
    assert champion is not None
    chain = [champion]  # champion → the version it replaced → ... → the first
    while (previous := registry.client.get_model_version(name, chain[-1]).tags.get(PREVIOUS)) is not None:
        chain.append(previous)
        assert len(chain) <= len(won) + 1, "a cycle in the previous-champion chain"
    # Every promotion a process reported is in the chain, once: none was silently overwritten.
    assert sorted(chain, key=int) == sorted([first, *won], key=int), (chain, won)
    assert [int(v) for v in chain] == sorted((int(v) for v in chain), reverse=True)
    for expected in chain[1:]:  # and rollback walks the chain back
        assert registry.rollback(name)[1] == expected


def test_a_stale_decision_moves_nothing(logged_model, registry: Registry, holdout: pl.DataFrame) -> None:
    name = "stale"
    a, b, c = (registry.register(logged_model[1], name) for _ in range(3))
    registry.gate(name, a, holdout, PromotionConfig())
    registry.apply_decision(name, b, True, a)  # b wins against a
    with pytest.raises(StaleDecisionError, match="moved from v1 to v2"):
        registry.apply_decision(name, c, True, a)  # c was gated against a: stale now
    assert registry.alias_version(name, CHAMPION) == b
    assert registry.client.get_model_version(name, c).tags.get(PREVIOUS) is None


def test_the_cli_recovers_from_a_champion_whose_files_are_gone(
    synthetic_manifest: Manifest, logged_model, registry: Registry, registry_store: str, holdout, tmp_path: Path
) -> None:
    name = "broken-champion"
    _, doomed_uri = train_logged_model(synthetic_manifest, registry_store, tmp_path / "doomed", *WEAK)
    broken = registry.register(doomed_uri, name)
    registry.gate(name, broken, holdout, PromotionConfig())
    model_id = doomed_uri.removeprefix("models:/")
    shutil.rmtree(Path(registry.client.get_logged_model(model_id).artifact_location.removeprefix("file://")))
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # and no copy of it is left to load
    candidate = registry.register(logged_model[1], name)
    holdout.write_parquet(tmp_path / "holdout.parquet")
    promote = ["promote", name, "--version", candidate, "--holdout", str(tmp_path / "holdout.parquet")]
    assert main(promote) == 2  # refused, and says how to recover
    with pytest.raises(RegistryError, match="cannot be loaded.*--force"):
        registry.gate(name, candidate, holdout, PromotionConfig())
    assert main([*promote, "--force"]) == 0
    assert registry.alias_version(name, CHAMPION) == candidate
    assert main(["rollback", name, "--to", candidate]) == 2  # already the champion: one line, no traceback
    assert main(["rollback", name]) == 0 and registry.alias_version(name, CHAMPION) == broken
    assert main(["rollback", name, "--to", candidate]) == 0 and registry.alias_version(name, CHAMPION) == candidate


# -- finding 10: no leftovers, no tracebacks ------------------------------------------------------
def test_failed_model_loads_leave_nothing_in_the_cache(
    synthetic_manifest: Manifest,
    registry: Registry,
    registry_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, uri = train_logged_model(synthetic_manifest, registry_store, tmp_path / "gone", *WEAK)
    version = registry.register(uri, "cache-leak")
    shutil.rmtree(
        Path(registry.client.get_logged_model(uri.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    )
    for _ in range(5):
        with pytest.raises(FileNotFoundError, match="no files for this model"):
            registry.bundle("cache-leak", version)
    cache = tmp_path / "cache" / "models"
    assert not cache.exists() or not list(cache.iterdir())
    # and the CLI says so in one line
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "in.parquet")
    score = ["score", "--model", f"models:/cache-leak/{version}", "--input", str(tmp_path / "in.parquet")]
    assert main([*score, "--output", str(tmp_path / "out.parquet")]) == 2
    err = capsys.readouterr().err
    assert "no files for this model" in err and "Traceback" not in err, err


def test_user_mistakes_are_one_line_errors(
    logged_model, registry: Registry, registry_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.register(logged_model[1], "mistakes")
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "h.parquet")
    cases = [
        ["promote", "mistakes", "--version", "99", "--holdout", str(tmp_path / "h.parquet")],
        [
            "score",
            "--model",
            "models:/mistakes/99",
            "--input",
            str(tmp_path / "h.parquet"),
            "--output",
            str(tmp_path / "o"),
        ],
        ["rollback", "mistakes"],
        ["models", "no-such-model"],
    ]
    for args in cases:
        code = main(args)
        err = capsys.readouterr().err
        assert code in (1, 2) and "Traceback" not in err, (args, err)
    # A store that another process holds locked.
    with sqlite3.connect(registry_store.removeprefix("sqlite:///"), timeout=1) as db:
        db.execute("BEGIN EXCLUSIVE")
        code = main(["models", "mistakes"])
        db.rollback()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
