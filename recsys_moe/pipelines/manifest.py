"""`manifest.json`: the contract between a built dataset and everything downstream.

The trainer sizes embedding tables from it, serving reloads vocabularies through it, and MLflow
logs it, so a model can always be traced to the exact data and spec it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from recsys_moe import atomic
from recsys_moe.features.spec import FeatureSpec

FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, from another format version, or malformed."""


def _inside(path: str) -> str:
    """A file the manifest names lies in its dataset: a manifest arrives with a model from the
    registry, and must not make a scorer read files elsewhere."""
    parts = {*PurePosixPath(path).parts, *PureWindowsPath(path).parts}
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or ".." in parts:
        raise ValueError(f"{path!r} is not a path inside the dataset")
    return path


Inside = Annotated[str, AfterValidator(_inside)]


class SparseFeatureInfo(BaseModel):
    name: str
    kind: Literal["categorical", "multi_hot", "dense"]
    num_embeddings: int
    embedding_dim: int
    pooling: Literal["sum", "mean"] = "sum"
    max_length: int = 1


class TaskInfo(BaseModel):
    name: str
    type: Literal["binary", "regression"]
    weight: float
    train_mean: float  # positive rate for binary tasks


class SplitInfo(BaseModel):
    shards: list[Inside]
    rows_in: int
    rows_out: int
    rows_rejected: int
    rejects: Inside | None = None
    # The valid raw rows of an evaluation split, in shard order: the holdout that a promotion gate
    # scores every model on through its own preprocessing (models may differ in vocabularies).
    raw: Inside | None = None
    reject_reasons: dict[str, int] = Field(default_factory=dict)


class EventsInfo(BaseModel):
    """The raw event log before splitting (specs with history features): the contract's counts."""

    rows_in: int
    rows_out: int
    rows_rejected: int
    rejects: str | None = None
    reject_reasons: dict[str, int] = Field(default_factory=dict)
    history_dir: str
    days_computed: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    spec: FeatureSpec
    spec_hash: str
    created_at: str
    source: str
    sparse_features: list[SparseFeatureInfo]
    dense_features: list[str]
    tasks: list[TaskInfo]
    vocab_files: dict[str, Inside]
    statistics: dict[str, dict[str, Any]]  # per dense feature: fill mean, transform mean/std, range, buckets
    splits: dict[str, SplitInfo]
    events: EventsInfo | None = None
    digest: str  # sha256 over the shards' bytes
    root: Path | None = Field(default=None, exclude=True)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def shard_paths(self, split: str) -> list[Path]:
        if split not in self.splits:
            raise KeyError(f"manifest has no split {split!r} (has {sorted(self.splits)})")
        base = self.root or Path(".")
        return [base / s for s in self.splits[split].shards]

    def raw_path(self, split: str) -> Path:
        info = self.splits.get(split)
        if info is None or info.raw is None:
            raise ManifestError(f"manifest has no raw rows for split {split!r}; rebuild it with `recsys-moe pipeline`")
        return (self.root or Path(".")) / info.raw

    def save(self, directory: Path) -> Path:
        return atomic.write_text(directory / "manifest.json", self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (build one with `recsys-moe pipeline`)")
        raw = json.loads(path.read_text())
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{path}: manifest format_version {version}, this recsys-moe reads {FORMAT_VERSION}")
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            raise ManifestError(
                f"{path}: not a manifest this recsys-moe can read ({fields}); rebuild it with `recsys-moe pipeline`"
            ) from None
        manifest.root = path.parent
        return manifest
