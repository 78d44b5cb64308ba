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


ROOT = Path(__file__).resolve().parents[1]


def test_every_pipeline_definition_validates() -> None:
    from recsys_moe.features import load_spec
    from recsys_moe.pipelines.definition import load_definition

    definitions = sorted((ROOT / "pipelines").glob("*.yaml"))
    assert definitions
    for path in definitions:
        load_spec(load_definition(path, {}).spec)


def test_a_pipeline_definition_runs_with_flags_on_top(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys_moe.cli import main
    from recsys_moe.pipelines.manifest import Manifest
    from recsys_moe.pipelines.sources import synthetic

    raw = tmp_path / "raw"
    config = synthetic.SyntheticConfig(n_users=60, n_items=40, n_impressions=2_000, n_days=5, seed=2)
    synthetic.write(synthetic.generate(config), raw)
    definition = ROOT / "pipelines" / "synthetic.yaml"
    assert main(["pipeline", "--config", str(definition), "--data", str(raw), "--out", str(tmp_path / "ds")]) == 0
    assert Manifest.load(tmp_path / "ds").spec.name == "synthetic"
    assert main(["pipeline", "--data", str(raw)]) == 2  # no spec, no out: said, not a traceback
    err = capsys.readouterr().err
    assert "invalid pipeline definition" in err and "spec:" in err and "out:" in err


def test_serve_takes_the_settings_file_and_flags_on_top(tmp_path: Path) -> None:
    from recsys_moe.cli import build_parser, serve_settings
    from recsys_moe.config import ConfigError

    example = str(ROOT / "serving" / "serving.yaml")
    settings = serve_settings(build_parser().parse_args(["serve", "--config", example]))
    assert settings.model_uri == "models:/demo-ranker@champion" and settings.port == 8000
    args = ["serve", "--config", example, "--model", "runs/x/best", "--port", "9001", "--weight", "click=2"]
    settings = serve_settings(build_parser().parse_args(args))
    assert settings.model_dir == Path("runs/x/best") and settings.model_uri is None  # the flag's source wins
    assert settings.port == 9001 and settings.ranking.weights == {"click": 2.0} and settings.poll_seconds == 30
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_dir: x\nport: abc\nthreads: 2\n")
    with pytest.raises(ConfigError, match="port") as raised:
        serve_settings(build_parser().parse_args(["serve", "--config", str(bad)]))
    assert "threads" in str(raised.value)  # an unknown field is named too
    # A typo'd worker or thread count is refused by name, not served with a thread per request.
    for flag, field in (("--scoring-workers", "scoring_workers"), ("--threads", "torch_threads")):
        with pytest.raises(ConfigError, match=field) as raised:
            serve_settings(build_parser().parse_args(["serve", "--model", "runs/x/best", flag, "100000"]))
        assert "less than or equal" in str(raised.value)


def test_serving_thread_defaults_are_held_to_the_same_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from recsys_moe.serving.settings import ServingSettings

    monkeypatch.setenv("RECSYS_MOE_THREADS", "999")
    with pytest.raises(ValidationError, match="torch_threads"):
        ServingSettings(model_dir=Path("runs/x/best"))
    monkeypatch.setenv("RECSYS_MOE_THREADS", "3")
    assert ServingSettings(model_dir=Path("runs/x/best")).torch_threads == 3
    monkeypatch.setattr("recsys_moe.serving.settings.available_cpus", lambda: 512)
    assert ServingSettings(model_dir=Path("runs/x/best")).scoring_workers == 64  # a big host's default stays valid


def test_a_missing_optional_part_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None\n"  # as on an install without the serving extra
        "from recsys_moe.cli import main\n"
        "sys.exit(main(['serve', '--model', 'runs/x/best']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "fastapi is not installed: pip install 'recsys-moe[serving]'" in out.stderr


def test_a_single_process_checkpoint_is_not_resumed_sharded(
    synthetic_manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recsys_moe.atomic import write_text
    from recsys_moe.cli import main
    from recsys_moe.training.checkpoint import PROGRESS, Progress

    write_text(tmp_path / "run" / "last" / PROGRESS, Progress(epoch=1).to_json())
    args = ["train", "--data", str(synthetic_manifest.root), "--checkpoint-dir", str(tmp_path / "run"), "--no-tracking"]
    assert main([*args, "--nproc", "2", "--resume"]) == 2  # refused before any rank starts
    assert "written by single-process training; resume it without --nproc" in capsys.readouterr().err
    assert (tmp_path / "run" / "last" / PROGRESS).is_file()  # and left as it was
