"""What a logged model needs to run anywhere MLflow runs it: its pip requirements and its code.

Stock MLflow tooling (`mlflow models serve`, `build-docker`, `spark_udf`) installs a model's
`requirements.txt` into a fresh environment and imports its code. Three things stand in the way
of doing that naively, and each has its answer here:

- **recsys-moe is not on PyPI.** The model carries the `recsys_moe` package itself as MLflow
  model code (`code_paths`, put on `sys.path` at load), so its requirements name only published
  distributions: the scoring path's own imports, pinned to the versions that trained it.
- **`torch==2.13.0` from PyPI is a multi-GB CUDA build.** On a CPU host the requirement is the
  CPU build's own version, `torch==2.13.0+cpu`, which no CUDA wheel satisfies, preceded by
  PyTorch's CPU index (`RECSYS_MOE_TORCH_INDEX_URL`; empty for none, where pip's own
  configuration already provides the wheel). A CUDA host logs `torch==2.13.0` and the CUDA fbgemm.
- **torchrec names the CUDA `fbgemm-gpu`**, which no requirements file can exclude (the project
  installs torchrec with `--no-deps`). A CPU model carries a tiny wheel named `fbgemm-gpu`,
  version `1.8.0+cpu`, with no files and one dependency, `fbgemm-gpu-cpu==1.8.0`, and requires
  exactly `fbgemm-gpu==1.8.0+cpu`: no CUDA wheel has that version, so pip takes the stand-in
  from the model's `artifacts/wheels` (a `--find-links` that pip reads relative to the
  requirements file, so it works from any directory, as `mlflow models build-docker` runs it).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import zipfile
from importlib import metadata
from pathlib import Path

import recsys_moe
from recsys_moe.features.spec import BUNDLED_SPECS

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What the scoring path imports (pyfunc_model → scoring → model, features, pipelines), besides torch.
SCORING_DISTRIBUTIONS = (
    "numpy",
    "pandas",
    "polars",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "safetensors",
    "tensordict",
    "torchmetrics",
    "tqdm",
    "pyre-extensions",
    "mlflow",
)
WHEELS_ARTIFACT = "wheels"  # the artifact (a folder) holding the stand-in wheel


def _version(name: str) -> str:
    return metadata.version(name)


def is_cpu_torch() -> bool:
    """The installed torch is a CPU build (`+cpu`), or has no CUDA at all."""
    import torch

    return _version("torch").endswith("+cpu") or torch.version.cuda is None


def uses_stand_in() -> bool:
    """Whether torchrec runs on fbgemm's CPU build here (so the model needs the `fbgemm-gpu`
    stand-in), rather than on the CUDA `fbgemm-gpu` (the stand-in itself does not count)."""
    try:
        return _version("fbgemm-gpu").endswith("+cpu")
    except metadata.PackageNotFoundError:
        return True


def torch_index_url() -> str | None:
    """The index pip needs for the CPU torch (PyTorch's own), unless the environment says otherwise."""
    value = os.environ.get("RECSYS_MOE_TORCH_INDEX_URL", TORCH_CPU_INDEX).strip()
    return value or None


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def fbgemm_cpu_shim(folder: Path) -> Path:
    """Write the `fbgemm-gpu` stand-in wheel (see the module docstring) into `folder`."""
    cpu = _version("fbgemm-gpu-cpu")
    name, version = "fbgemm_gpu", f"{cpu}+cpu"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": (
            "Metadata-Version: 2.1\n"
            "Name: fbgemm-gpu\n"
            f"Version: {version}\n"
            "Summary: recsys-moe stand-in: satisfies torchrec's fbgemm-gpu requirement with the CPU build\n"
            f"Requires-Dist: fbgemm-gpu-cpu=={cpu}\n"
        ).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: recsys-moe\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            info_ = zipfile.ZipInfo(path, date_time=(2026, 1, 1, 0, 0, 0))  # same bytes every time
            info_.external_attr = 0o644 << 16
            zf.writestr(info_, data)
    return wheel


def requirements(wheels: Path | None) -> list[str]:
    """The model's pip requirements: torch of this host's kind (CPU or CUDA), torchrec with the
    fbgemm it runs on here, and the scoring path's other distributions, all pinned to what is
    installed. `wheels`: the folder of the stand-in wheel as it lies in the logged model (relative
    to the model's directory), when `uses_stand_in()`."""
    lines: list[str] = []
    torch_base = _version("torch").split("+")[0]
    if is_cpu_torch():
        index = torch_index_url()
        lines += [f"--extra-index-url {index}"] if index else []
        lines.append(f"torch=={torch_base}+cpu")
    else:
        lines.append(f"torch=={torch_base}")  # PyPI's default build is the CUDA one
    if uses_stand_in():
        cpu = _version("fbgemm-gpu-cpu")
        lines.append(f"fbgemm-gpu-cpu=={cpu}")
        if wheels is not None:
            lines[:0] = [f"--find-links {wheels.as_posix()}"]
            lines.append(f"fbgemm-gpu=={cpu}+cpu")
    else:
        lines.append(f"fbgemm-gpu=={_version('fbgemm-gpu')}")
    lines.append(f"torchrec=={_version('torchrec')}")
    lines += [f"{name}=={_version(name)}" for name in SCORING_DISTRIBUTIONS]
    return lines


def package_code(folder: Path) -> Path:
    """A clean copy of the `recsys_moe` package (sources, type marker, bundled specs) in
    `folder`, to log as the model's code: no caches, the specs where an installed wheel has them."""
    source = Path(recsys_moe.__file__).resolve().parent
    target = folder / "recsys_moe"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "specs"))
    shutil.copytree(BUNDLED_SPECS, target / "specs", ignore=shutil.ignore_patterns("__pycache__"))
    return target


class _StandInOnly(logging.Filter):
    """Drops MLflow's "mismatches between the model's dependencies and the current environment"
    warning when the stand-in is the only mismatch: the project's own environment runs torchrec on
    fbgemm-gpu-cpu without it (installed `--no-deps`), which is what the stand-in stands for."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "mismatches between the model's dependencies" not in message:
            return True
        mismatches = [line for line in message.splitlines() if line.startswith(" - ")]
        return not mismatches or not all(line.startswith(" - fbgemm-gpu ") for line in mismatches)


logging.getLogger("mlflow.utils.requirements_utils").addFilter(_StandInOnly())
