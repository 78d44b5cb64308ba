"""The model lifecycle against a real MLflow tracking server on PostgreSQL, over HTTP.

What the README's "Production" section runs: a throwaway PostgreSQL (`tests/postgres.py`), then
`mlflow server --backend-store-uri postgresql+psycopg://... --serve-artifacts`, and every
recsys-moe command pointed at it with MLFLOW_TRACKING_URI=http://...: train and register (the
gate), list, promote, roll back, serve following the alias, batch-score by `models:/` URI, and
two promoters racing through the server with the alias lock in the server's database. Skips
where PostgreSQL's binaries are absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from recsys_moe.cli import main
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.registry.versions import CHAMPION, PREVIOUS, Registry
from recsys_moe.scoring.batch import read_result
from recsys_moe.serving.app import create_app
from recsys_moe.serving.settings import ServingSettings
from tests import postgres
from tests.conftest import train_logged_model
from tests.processes import wait_for_http
from tests.test_safety_registry import WORKER
from tests.test_serving import serve

MLFLOW = Path(sys.executable).parent / "mlflow"
TRAIN = ["--set", "train.epochs=1", "--set", "model.num_experts=2", "--set", "model.expert_hidden=[32]"]


def mlflow_server_command(backend: str, artifacts: Path, port: int) -> list[str]:
    """The command the README and compose.yaml give for the tracking server."""
    return [
        str(MLFLOW),
        "server",
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
    ]


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.Postgres]:
    why = postgres.unavailable()
    if why:
        pytest.skip(why)
    with postgres.postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def tracking_server(pg: postgres.Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(the server's http URI, its PostgreSQL URL), for this module's tests."""
    tmp = tmp_path_factory.mktemp("tracking")
    backend = pg.create_database("mlflow")
    port = postgres.free_port()
    log = (tmp / "server.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        mlflow_server_command(backend, tmp / "artifacts", port),
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", proc, (tmp / "server.log").read_text)  # the first start migrates the schema
        yield uri, backend
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def _wait_for_version(url: str, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ready = httpx.get(f"{url}/readyz", timeout=10)
        if ready.status_code == 200 and ready.json()["model"].get("version") == version:
            return
        assert time.monotonic() < deadline, f"still serving {ready.text}, want v{version}"
        time.sleep(0.3)


@pytest.mark.slow
def test_the_lifecycle_over_http_on_postgresql(
    tracking_server: tuple[str, str],
    synthetic_manifest: Manifest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri, backend = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RECSYS_MOE_LOCK_URI", backend)
    data, name = str(synthetic_manifest.root), "ranker"
    train = ["train", "--data", data, "--register", name, *TRAIN]

    assert main([*train, "--checkpoint-dir", str(tmp_path / "a")]) == 0  # v1: no champion yet
    assert main([*train, "--checkpoint-dir", str(tmp_path / "b"), "--seed", "7"]) == 0  # v2: gated against v1
    registry = Registry(uri)
    v2 = registry.client.get_model_version(name, "2")
    assert v2.tags["gate.decision"] in ("promoted", "not promoted") and "gate.reason" in v2.tags
    assert v2.description.startswith("**Gate:") and "| click.auc |" in v2.description
    run = registry.client.get_run(v2.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # files went through the server
    assert run.info.run_name.startswith("synthetic-mmoe-") and run.data.tags["mlflow.source.name"]
    assert run.data.tags["mlflow.user"] and run.data.tags["recsys_moe.version"] == "0.1.0"
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout: the commit that trained it
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    experiment = registry.client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs

    capsys.readouterr()
    assert main(["models", name]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and " 1 " in listing and " 2 " in listing, listing

    if registry.alias_version(name, CHAMPION) != "2":
        holdout = str(synthetic_manifest.raw_path("test"))
        assert main(["promote", name, "--version", "2", "--holdout", holdout, "--force"]) == 0
    assert registry.alias_version(name, CHAMPION) == "2"
    assert registry.client.get_model_version(name, "2").tags[PREVIOUS] == "1"

    settings = ServingSettings(model_uri=f"models:/{name}@{CHAMPION}", poll_seconds=0.3)
    rows = read_holdout(synthetic_manifest.raw_path("test")).head(200)
    with serve(create_app(settings)) as url:
        _wait_for_version(url, "2")
        assert main(["rollback", name]) == 0
        assert registry.alias_version(name, CHAMPION) == "1"
        _wait_for_version(url, "1")  # serving follows the alias, no restart
        columns = registry.scorer(name, "1").input_columns
        payload = {"rows": rows.head(20).select(columns).to_dicts()}
        answer = httpx.post(f"{url}/v1/score", json=json.loads(json.dumps(payload, default=str)), timeout=30)
        assert answer.status_code == 200, answer.text

    rows.write_parquet(tmp_path / "rows.parquet")
    out = tmp_path / "scores.parquet"
    assert main(["score", "--model", f"models:/{name}@{CHAMPION}", "--input", str(tmp_path / "rows.parquet"), "--output", str(out)]) == 0  # fmt: skip
    record = read_result(out)
    assert record["rows_in"] == 200 and record["rows_out"] + record["rows_rejected"] == 200
    assert record["model"] == f"models:/{name}/1"  # the alias, resolved: the version that scored


@pytest.mark.slow
def test_two_promoters_racing_through_the_server_are_serialised(
    tracking_server: tuple[str, str], synthetic_manifest: Manifest, tmp_path: Path
) -> None:
    """Moves through an http server are locked in the server's database (RECSYS_MOE_LOCK_URI):
    every promotion a process was told succeeded is in the previous-champion chain, once."""
    uri, backend = tracking_server
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RECSYS_MOE_LOCK_URI": backend}
    env["RECSYS_MOE_CACHE"] = str(tmp_path / "cache")
    _, model_uri = train_logged_model(synthetic_manifest, uri, tmp_path / "run", "train.epochs=1")
    registry, name = Registry(uri), "race-over-http"
    read_holdout(synthetic_manifest.raw_path("test")).head(300).write_parquet(tmp_path / "holdout.parquet")
    won = _race(uri, name, model_uri, tmp_path / "holdout.parquet", env)
    _check_chain(registry, name, won)


def _race(store: str, name: str, model_uri: str, holdout: Path, env: dict[str, str]) -> list[str]:
    """Two processes registering and force-promoting versions of `name` at once, 3 rounds each:
    the versions each was told it promoted."""
    args = [store, name, model_uri, str(holdout), "3"]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    won: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        won += json.loads(next(line for line in out.splitlines() if line.startswith("WON "))[4:])
    return won


def _check_chain(registry: Registry, name: str, won: list[str]) -> None:
    """Every promotion reported is in the champion → previous-champion chain, once: none was lost."""
    chain = [str(registry.alias_version(name, CHAMPION))]
    while (previous := registry.client.get_model_version(name, chain[-1]).tags.get(PREVIOUS)) is not None:
        chain.append(previous)
        assert len(chain) <= len(won) + 1, "a cycle in the previous-champion chain"
    assert sorted(chain, key=int) == sorted(won, key=int), (chain, won)


@pytest.mark.slow
def test_a_postgresql_uri_is_a_store_with_a_locked_registry(
    pg: postgres.Postgres, synthetic_manifest: Manifest, tmp_path: Path
) -> None:
    """MLFLOW_TRACKING_URI=postgresql+psycopg://... with no server: runs, models and the registry
    live in the database, and alias moves take PostgreSQL advisory locks (two racing promoters)."""
    store = pg.create_database("direct")
    _, model_uri = train_logged_model(synthetic_manifest, store, tmp_path / "run", "train.epochs=1")
    read_holdout(synthetic_manifest.raw_path("test")).head(300).write_parquet(tmp_path / "holdout.parquet")
    env = {**os.environ, "RECSYS_MOE_CACHE": str(tmp_path / "cache")}
    env.pop("RECSYS_MOE_LOCK_URI", None)
    won = _race(store, "race-in-db", model_uri, tmp_path / "holdout.parquet", env)
    _check_chain(Registry(store), "race-in-db", won)


def test_an_unreachable_lock_store_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock database nobody listens on: the move does not happen unlocked; the error names the
    lock and its store, with the password hidden."""
    from recsys_moe.registry.lock import LockTimeoutError, alias_lock

    monkeypatch.setenv("RECSYS_MOE_LOCK_URI", f"postgresql+psycopg://u:secret@127.0.0.1:{postgres.free_port()}/db")
    moved = []
    expected = r"alias lock of 'ranker' in postgresql\+psycopg://u:\*\*\*@"
    with pytest.raises(LockTimeoutError, match=expected) as err, alias_lock("http://mlflow:5000", "ranker"):
        moved.append(True)
    assert not moved and "secret" not in str(err.value) and "\n" not in str(err.value)
