"""`pip install .` as a library user does it, in a fresh virtualenv that has only the CPU torch:
the declared dependencies suffice, the one import root is `recsys_moe`, the bundled specs ship.

Follows the README's install steps (torch, then fbgemm and torchrec without its CUDA dependency,
then the project). Versions are held to the pins with `-c` so the run is repeatable; the
constraints add no package, so a missing dependency still fails here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-compile"]
    pins = ["-c", REQUIREMENTS / "torch.txt", "-c", REQUIREMENTS / "lock.txt"]
    _run(*pip, "-r", REQUIREMENTS / "torch.txt", cwd=tmp_path)  # the CPU build, first and alone
    _run(*pip, "--no-deps", "-r", REQUIREMENTS / "torchrec.txt", cwd=tmp_path)
    # Not editable: the wheel a user gets, built from a copy (a build writes build/ beside the source).
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=lambda d, names: SKIP & set(names) if Path(d) == ROOT else {"__pycache__"})
    _run(*pip, *pins, source, cwd=tmp_path)

    torch_version = _run(python, "-c", "import torch; print(torch.__version__)", cwd=tmp_path).strip()
    assert torch_version.endswith("+cpu"), f"pip replaced the CPU torch: {torch_version}"
    assert "generate" in _run(bin_dir / "recsys-moe", "--help", cwd=tmp_path)
    _run(python, "-c", "import recsys_moe, recsys_moe.model.ranker, recsys_moe.registry.versions", cwd=tmp_path)
    assert "census_group1" in _run(bin_dir / "recsys-moe", "specs", cwd=tmp_path)  # package data shipped

    files = _run(python, "-m", "pip", "show", "-f", "recsys-moe", cwd=tmp_path).split("Files:", 1)[1].split()
    top = {f.split("/")[0] for f in files if not f.startswith("..")}
    assert {t for t in top if not t.endswith(".dist-info")} == {"recsys_moe"}, top
    assert not {"features", "pipelines", "serving"} & top
