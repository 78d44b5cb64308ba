"""A registered model served by stock MLflow from a fresh environment, and what makes that work:
the logged requirements (CPU torch, torchrec's fbgemm stand-in) and the model's own code.

The slow test does what the README's "Serving with MLflow" section says, in a new virtualenv
that has only MLflow: download the champion's requirements, install them, `mlflow models serve
-m models:/<name>@champion --env-manager local`, and compares its answers with batch scoring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest

from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry import environment
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.registry.versions import Registry
from recsys_moe.scoring import Scorer
from recsys_moe.scoring.batch import score_parquet
from tests.postgres import free_port
from tests.processes import wait_for_http

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_ask_for_the_cpu_torch_and_never_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECSYS_MOE_TORCH_INDEX_URL", raising=False)
    lines = environment.requirements(Path("artifacts/wheels"))
    assert lines[:2] == ["--find-links artifacts/wheels", f"--extra-index-url {environment.TORCH_CPU_INDEX}"]
    assert "torch==2.13.0+cpu" in lines and "fbgemm-gpu-cpu==1.8.0" in lines and "torchrec==1.8.0" in lines
    assert "fbgemm-gpu==1.8.0+cpu" in lines  # only the stand-in has that version: never the CUDA build
    assert not [line for line in lines if "recsys" in line]
    assert all("==" in line for line in lines if not line.startswith("--"))  # every pin exact
    monkeypatch.setenv("RECSYS_MOE_TORCH_INDEX_URL", "")  # pip's own configuration has the wheel
    assert not [line for line in environment.requirements(None) if line.startswith("--")]


def test_fbgemm_is_the_one_torchrec_runs_on_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with the CUDA fbgemm logs it; one with the CPU build, or with the stand-in itself
    (an environment made from a model's requirements), logs the CPU build and the stand-in."""
    installed = {"fbgemm-gpu": "1.8.0"}
    real = environment._version
    monkeypatch.setattr(environment, "_version", lambda name: installed.get(name) or real(name))
    lines = environment.requirements(Path("artifacts/wheels"))
    assert "fbgemm-gpu==1.8.0" in lines and not [line for line in lines if "cpu==" in line or "find-links" in line]
    installed["fbgemm-gpu"] = "1.8.0+cpu"  # the stand-in
    lines = environment.requirements(Path("artifacts/wheels"))
    assert {"fbgemm-gpu-cpu==1.8.0", "fbgemm-gpu==1.8.0+cpu", "--find-links artifacts/wheels"} <= set(lines)


def test_the_fbgemm_stand_in_is_a_valid_wheel_that_only_pulls_the_cpu_build(tmp_path: Path) -> None:
    wheel = environment.fbgemm_cpu_shim(tmp_path)
    (tmp_path / "again").mkdir()
    again = environment.fbgemm_cpu_shim(tmp_path / "again")
    assert wheel.read_bytes() == again.read_bytes()  # the same bytes each time a model is logged
    with zipfile.ZipFile(wheel) as zf:
        assert sorted(n.split("/")[-1] for n in zf.namelist()) == ["METADATA", "RECORD", "WHEEL"]  # no files
        meta = zf.read("fbgemm_gpu-1.8.0+cpu.dist-info/METADATA").decode()
    assert "Name: fbgemm-gpu\n" in meta and "Requires-Dist: fbgemm-gpu-cpu==1.8.0\n" in meta
    report = tmp_path / "report.json"
    subprocess.run(  # pip reads it as a wheel and resolves its one dependency, installing nothing
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--report", str(report), str(wheel)],
        check=True,
        capture_output=True,
    )
    names = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    assert names <= {"fbgemm-gpu"}  # fbgemm-gpu-cpu is already installed here


def test_the_logged_code_is_the_package_with_its_specs(tmp_path: Path) -> None:
    code = environment.package_code(tmp_path)
    assert (code / "scoring" / "scorer.py").is_file() and (code / "specs" / "synthetic.yaml").is_file()
    assert not list(code.rglob("__pycache__"))


def _fresh_venv(where: Path) -> Path:
    """A new virtualenv with MLflow only (at the version that logged the model)."""
    from importlib import metadata

    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q"]
    mlflow_pin = f"mlflow=={metadata.version('mlflow')}"
    subprocess.run([*pip, mlflow_pin, "-c", str(ROOT / "requirements" / "lock.txt")], check=True, timeout=900)
    return where / "bin"


@pytest.mark.slow
def test_stock_mlflow_serves_the_champion_from_a_fresh_venv(
    synthetic_manifest: Manifest, logged_model, registry_store: str, tmp_path: Path
) -> None:
    result, model_uri = logged_model
    name = "served-by-mlflow"
    registry = Registry(registry_store)
    version = registry.register(model_uri, name)
    registry.apply_decision(name, version, True, None)
    bin_dir = _fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV", "PYTHON"))}
    # As `source venv/bin/activate` leaves it: `mlflow models serve` starts `uvicorn` from PATH.
    env.update({"MLFLOW_TRACKING_URI": registry_store, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"})
    env["VIRTUAL_ENV"] = str(bin_dir.parent)

    def run(*args: str, cwd: Path = tmp_path) -> str:
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(args[:4])}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc.stdout

    probe = subprocess.run([bin_dir / "python", "-c", "import recsys_moe"], cwd=tmp_path, capture_output=True)
    assert probe.returncode != 0  # nothing of the project is installed by hand
    uri = f"models:/{name}@champion"
    run(str(bin_dir / "mlflow"), "artifacts", "download", "-u", uri, "-d", str(tmp_path / "model"))
    requirements = (tmp_path / "model" / "requirements.txt").read_text()
    assert "recsys" not in requirements and "torch==2.13.0+cpu" in requirements
    # From another directory, as `mlflow models build-docker` runs it: the wheel folder is found
    # relative to the requirements file.
    run(str(bin_dir / "pip"), "install", "-q", "-r", str(tmp_path / "model" / "requirements.txt"))
    stand_in = run(
        str(bin_dir / "python"), "-c", "from importlib.metadata import version; print(version('fbgemm-gpu'))"
    )
    assert stand_in.strip() == "1.8.0+cpu"
    torch_build = run(str(bin_dir / "python"), "-c", "import torch; print(torch.__version__)")
    assert torch_build.strip().endswith("+cpu")

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [bin_dir / "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-p", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, (tmp_path / "serve.log").read_text, 180)
        scorer = Scorer(result.model_dir)
        rows = read_holdout(synthetic_manifest.raw_path("test")).head(300).select(scorer.input_columns)
        body = {"dataframe_split": json.loads(rows.to_pandas().to_json(orient="split", index=False))}
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        served = np.array([[p[t] for t in scorer.tasks] for p in answer.json()["predictions"]])
        rows.write_parquet(tmp_path / "rows.parquet")
        report = score_parquet(scorer, tmp_path / "rows.parquet", tmp_path / "batch.parquet", progress=False)
        assert report.rows_rejected == 0
        batch = pl.read_parquet(tmp_path / "batch.parquet").select(scorer.tasks).to_numpy()
        assert served.shape == batch.shape == (300, len(scorer.tasks))
        np.testing.assert_allclose(served, batch, rtol=0, atol=1e-6)
        bad = httpx.post(  # the input contract holds here too: a clear 4xx, and it keeps serving
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_split": {**body["dataframe_split"], "data": [["x"] * len(scorer.input_columns)]}},
            timeout=60,
        )
        assert 400 <= bad.status_code < 500, bad.text
        assert httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60).status_code == 200
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_only_the_stand_in_missing_here_is_not_a_warning() -> None:
    """The project's own environment has no stand-in (torchrec is installed --no-deps): MLflow's
    mismatch warning is dropped for it alone, and kept whenever anything else differs."""
    import logging

    def passes(message: str) -> bool:
        logger = logging.getLogger("mlflow.utils.requirements_utils")
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, None, None)
        return all(f.filter(record) for f in logger.filters)

    head = "Detected one or more mismatches between the model's dependencies and the current Python environment:\n"
    stand_in = " - fbgemm-gpu (current: uninstalled, required: fbgemm-gpu==1.8.0+cpu)\n"
    assert not passes(head + stand_in + "To fix ...")
    assert passes(head + stand_in + " - polars (current: 1.0, required: polars==2.1.0)\nTo fix ...")
    assert passes("something else entirely")
