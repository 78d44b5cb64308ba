"""`pip install .` as a library user does it, in a fresh virtualenv: the declared dependencies
suffice, the one import root is `recsys_moe`, the bundled specs ship, and the serving image's
entry point serves from there.

The install is `deploy/install.sh`, the script the serving Dockerfile runs (torch, then fbgemm
and torchrec without its CUDA dependency, then the project with its serving and PostgreSQL
extras). Versions are held to the pins with `-c` so the run is repeatable; the constraints add
no package, so a missing dependency still fails here. The Dockerfile and compose.yaml are
checked against what the tests run: there is no Docker daemon here to build them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.postgres import free_port
from tests.processes import wait_for_http

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
# Local artifacts at the top of the checkout, not part of what a user installs from.
SKIP = {
    ".venv",
    ".git",
    "build",
    "runs",
    "data",
    "demo",
    "mlruns.db",
    "mlartifacts",
    "benchmarks",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "recsys_moe.egg-info",
}


def _run(*args: str | Path, cwd: Path, timeout: int = 900) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args[:6]))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def dockerfile() -> dict[str, list[str]]:
    """The Dockerfile's instructions, by keyword (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            out.setdefault(keyword, []).append(rest)
    return out


def test_the_image_installs_with_the_tested_script_and_compose_runs_the_tested_commands() -> None:
    from tests.test_tracking_server import mlflow_server_command

    image = dockerfile()
    installs = [r for r in image["RUN"] if "pip" in r or "install" in r]
    assert installs == ['TORCH_INDEX="$TORCH_INDEX" sh deploy/install.sh .'], installs
    copied = {c.split()[0].rstrip("/") for c in image["COPY"]}
    assert {"pyproject.toml", "requirements", "recsys_moe", "features/specs", "deploy/install.sh"} <= copied
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    assert compose["endpoint"]["command"] == json.loads(image["CMD"][0])
    ours = mlflow_server_command("DB", Path("ART"), 5000)
    flags = [a for a in compose["mlflow"]["command"] if a.startswith("--") and a != "--allowed-hosts"]
    assert Path(ours[0]).name == compose["mlflow"]["command"][0] and flags == [a for a in ours if a.startswith("--")]


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv(tmp_path: Path, logged_model) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    # Not editable: the wheel a user gets, built from a copy (a build writes build/ beside the source).
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=lambda d, names: SKIP & set(names) if Path(d) == ROOT else {"__pycache__"})
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env["TORCH_INDEX"] = ""  # this machine's pip configuration holds the CPU wheel
    proc = subprocess.run(
        ["sh", "deploy/install.sh", "."], cwd=source, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"deploy/install.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    torch_version = _run(python, "-c", "import torch; print(torch.__version__)", cwd=tmp_path).strip()
    assert torch_version.endswith("+cpu"), f"pip replaced the CPU torch: {torch_version}"
    assert "generate" in _run(bin_dir / "recsys-moe", "--help", cwd=tmp_path)
    _run(python, "-c", "import recsys_moe, recsys_moe.model.ranker, recsys_moe.registry.versions", cwd=tmp_path)
    assert "census_group1" in _run(bin_dir / "recsys-moe", "specs", cwd=tmp_path)  # package data shipped

    files = _run(python, "-m", "pip", "show", "-f", "recsys-moe", cwd=tmp_path).split("Files:", 1)[1].split()
    top = {f.split("/")[0] for f in files if not f.startswith("..")}
    assert {t for t in top if not t.endswith(".dist-info")} == {"recsys_moe"}, top
    assert not {"features", "pipelines", "serving"} & top

    # The image's entry point, run from this venv with a model directory for its CMD.
    entry = json.loads(dockerfile()["ENTRYPOINT"][0])
    port = free_port()
    args = [*entry, "--model", str(logged_model[0].model_dir), "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([bin_dir / args[0], *args[1:]], cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", server, lambda: f"{shlex.join(args)}\n{log.read_text()}")
        docs = httpx.get(f"http://127.0.0.1:{port}/docs-assets/swagger-ui-bundle.js", timeout=10)
        assert docs.status_code == 200  # the installed swagger-ui-bundle: /docs works offline
    finally:
        server.terminate()
        server.wait(timeout=30)
