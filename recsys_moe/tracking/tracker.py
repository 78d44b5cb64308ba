"""The trainer's view of experiment tracking: a few verbs, implemented by MLflow or by nothing.

The trainer never imports mlflow itself, so tracking can be switched off (tests, sweeps) and a
different backend could be added without touching the training loop.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from recsys_moe.config import TrackingConfig
from recsys_moe.tracking.store import ARTIFACTS_NAME, tracking_uri

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


class Tracker(Protocol):
    @property
    def run_id(self) -> str | None: ...  # None: nothing is tracked
    @property
    def uri(self) -> str | None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_file(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Figure, name: str) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _Closing:
    """`with tracker:` ends the run FINISHED, FAILED on an error, KILLED on Ctrl-C."""

    def close(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.close("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


class NullTracker(_Closing):
    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_file(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Figure, name: str) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


# MLflow 3's UI opens an experiment without this tag on its GenAI overview; ours train models.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def run_name(spec: str, arch: str) -> str:
    """`<spec>-<arch>-<UTC time>`: runs sort and read in the UI instead of MLflow's random names."""
    return f"{spec}-{arch}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return str(os.getuid())


def source_tags(source: str | None = None) -> dict[str, str]:
    """What the UI shows as a run's Source, User and Git commit, and the recsys-moe version:
    enough to find the code that trained a model. The commit is the checkout recsys-moe runs
    from (an editable install); an installed wheel has none, its version says it."""
    from importlib import metadata

    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv and sys.argv[0] else "python"
    tags = {"mlflow.user": _user(), "mlflow.source.type": "LOCAL", "mlflow.source.name": source or command}
    with contextlib.suppress(metadata.PackageNotFoundError):
        tags["recsys_moe.version"] = metadata.version("recsys-moe")
    package = str(Path(__file__).resolve().parents[1])
    commit = get_git_commit(package)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        url = get_git_repo_url(package)
        for key, value in (("branch", get_git_branch(package)), ("repoURL", url and re.sub(r"//[^/@]*@", "//", url))):
            if value:  # a remote URL's user:token@ is not for the tracking server
                tags[f"mlflow.source.git.{key}"] = value
    return tags


class MlflowTracker(_Closing):
    """One MLflow run. Creates the experiment on first use (as a classic ML experiment); in the
    default embedded store its artifacts go to ./mlartifacts beside ./mlruns.db. A new run is
    named `run_name` and tagged with where it was started from (`source_tags`)."""

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        uri: str | None = None,
        run_id: str | None = None,
        source: str | None = None,
    ) -> None:
        import mlflow

        self.uri: str = uri or tracking_uri()
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / ARTIFACTS_NAME).resolve().as_uri()
            try:
                experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location, tags=EXPERIMENT_KIND
                )
            except mlflow.exceptions.MlflowException:  # created by a concurrent run meanwhile
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = exp.experiment_id
            if "mlflow.experimentKind" not in exp.tags:
                self.client.set_experiment_tag(experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        self.experiment_id = experiment_id
        if run_id is not None:  # resuming: keep logging into the interrupted run
            self.client.update_run(run_id, status="RUNNING")
            self.run_id: str = run_id
        else:
            tags = source_tags(source)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        log.info("MLflow run %s in experiment %r at %s", self.run_id, experiment, self.uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Figure, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            figure.savefig(path, dpi=110)
            self.client.log_artifact(self.run_id, str(path), "plots")
        import matplotlib.pyplot as plt

        plt.close(figure)

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        # MetaDataset records name + digest without MLflow reading the data itself.
        dataset = MetaDataset(  # type: ignore[abstract]  # mlflow's stub; MetaDataset is concrete
            source=HTTPDatasetSource(url=Path(source).resolve().as_uri()), name=name, digest=digest[:36]
        )
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self.client.log_inputs(self.run_id, datasets=[entity])

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def open_tracker(config: TrackingConfig, spec_name: str, arch: str, run_id: str | None = None) -> Tracker:
    """The run's tracker: MLflow in the experiment `recsys-moe/<spec>` unless the config names
    one, a new run named `<spec>-<arch>-<time>` (or the config's name) or, resuming, `run_id`;
    nothing when tracking is off."""
    if not config.enabled:
        return NullTracker()
    name = config.run_name or run_name(spec_name, arch)
    return MlflowTracker(config.experiment or f"recsys-moe/{spec_name}", run_name=name, run_id=run_id)
