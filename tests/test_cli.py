from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "recsys_moe.cli"]


def _run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
    )


def test_help_lists_every_step(tmp_path: Path) -> None:
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0
    for cmd in ("generate", "pipeline", "train", "demo", "specs", "ui"):
        assert cmd in out.stdout
    assert _run("train", "--help", cwd=tmp_path).returncode == 0


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfeatures: [{name: a, kind: categorical}]\ntasks: [{name: t, label: y}]\n")
    out = _run("pipeline", "--spec", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert out.returncode == 2
    assert "embedding_dim: required" in out.stderr and "Traceback" not in out.stderr
    out = _run("train", "--data", str(tmp_path / "missing"), cwd=tmp_path)
    assert out.returncode == 2 and "no manifest" in out.stderr


@pytest.mark.slow
def test_generate_pipeline_train_from_the_command_line(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    assert (
        _run(
            "generate", "raw", "--users", "300", "--items", "200", "--impressions", "8000", "--days", "6", cwd=tmp_path
        ).returncode
        == 0
    )
    out = _run("pipeline", "--spec", "synthetic", "--data", "raw", "--out", "ds", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "manifest:" in out.stdout
    out = _run(
        "train",
        "--data",
        "ds",
        "--arch",
        "shared_bottom",
        "--epochs",
        "2",
        "--set",
        "train.batch_size=256",
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "test metrics" in out.stdout and "click" in out.stdout and "MLflow run:" in out.stdout
    assert (tmp_path / "runs" / "synthetic-shared_bottom" / "best" / "model.safetensors").exists()


def test_ui_prints_the_command_for_the_default_store(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [*CLI, "ui", "--print-only"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlruns.db" in out.stdout
