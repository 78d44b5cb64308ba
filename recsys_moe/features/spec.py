"""The feature spec: one YAML file that says what every raw column means to the model.

It is validated at the edge, so a typo fails at load time with the field's path in the message
rather than as a shape error deep inside training.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recsys_moe.atomic import inside
from recsys_moe.config import load_yaml
from recsys_moe.features.expressions import ExpressionError, compile_expression
from recsys_moe.features.history import HistorySpec

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _identifier(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError(f"{v!r} is not an identifier (letters, digits, underscore)")
    return v


# Feature and task names become column names, MLflow metric keys and Python-side identifiers.
Identifier = Annotated[str, AfterValidator(_identifier)]


class SpecError(ValueError):
    """A feature spec that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_OOV_RATE = 0.02


class VocabPolicy(_Strict):
    """How raw values become embedding rows. Row 0 is always the OOV/null row."""

    kind: Literal["fitted", "hash"] = "fitted"
    min_count: int = Field(1, ge=1, description="fitted: values seen fewer times map to OOV")
    max_size: int | None = Field(None, ge=1, description="fitted: keep only the most frequent values")
    buckets: int | None = Field(None, ge=1, description="hash: number of hash buckets")
    oov_rate: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="share of training ids replaced by the OOV row, so that unseen ids at serving time get "
        "a learned vector rather than a random one (default: 0.02 fitted, 0 hash)",
    )

    @property
    def training_oov_rate(self) -> float:
        """`oov_rate`, or its default: fitted vocabularies drop 2% of ids to OOV; hashed ones, which
        have no unseen values, none."""
        if self.oov_rate is not None:
            return self.oov_rate
        return DEFAULT_OOV_RATE if self.kind == "fitted" else 0.0

    @property
    def hash_buckets(self) -> int:
        """`buckets` of a hash vocabulary (validated to be set)."""
        if self.buckets is None:
            raise ValueError("not a hash vocabulary")
        return self.buckets

    @model_validator(mode="after")
    def _check(self) -> VocabPolicy:
        if self.kind == "hash" and self.buckets is None:
            raise ValueError("buckets: required when kind is 'hash'")
        if self.kind == "fitted" and self.buckets is not None:
            raise ValueError("buckets: only valid when kind is 'hash'")
        return self


class Feature(_Strict):
    name: Identifier
    column: str | None = Field(None, description="raw column; defaults to the feature name")
    kind: Literal["categorical", "multi_hot", "dense"]
    vocab: VocabPolicy | None = None
    embedding_dim: int | None = Field(None, ge=1)
    pooling: Literal["sum", "mean"] = "sum"
    max_length: int = Field(50, ge=1, description="multi_hot: longest list kept (most recent first)")
    separator: str | None = Field(None, description="multi_hot: split a string column on this")
    transform: Literal["none", "standardize", "log1p", "bucketize"] = "standardize"
    num_buckets: int = Field(10, ge=2, description="bucketize: quantile buckets fitted on train")
    nullable: bool = True
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Feature:
        embedded = self.kind != "dense" or self.transform == "bucketize"
        if embedded and self.embedding_dim is None:
            what = "bucketized dense" if self.kind == "dense" else self.kind
            raise ValueError(f"embedding_dim: required for {what} features")
        if self.embedding_dim is not None and self.embedding_dim % 4:
            raise ValueError(
                f"embedding_dim: {self.embedding_dim} is not a multiple of 4 (FBGEMM's embedding kernels need one)"
            )
        if not embedded and self.embedding_dim is not None:
            raise ValueError("embedding_dim: only valid for categorical, multi_hot or bucketized features")
        if self.kind == "dense" and self.vocab is not None:
            raise ValueError("vocab: dense features have no vocabulary")
        if self.kind != "dense" and (self.min is not None or self.max is not None):
            raise ValueError("min/max: range checks apply to dense features only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.separator is not None and self.kind != "multi_hot":
            raise ValueError("separator: only valid for multi_hot features")
        return self

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def vocab_policy(self) -> VocabPolicy:
        return self.vocab or VocabPolicy()

    @property
    def table_dim(self) -> int:
        """The embedding dimension of a feature the model looks up (validated to be set)."""
        if self.embedding_dim is None:
            raise ValueError(f"feature {self.name!r} has no embedding")
        return self.embedding_dim

    @property
    def is_sparse(self) -> bool:
        """Whether the model looks this feature up in an embedding table."""
        return self.kind != "dense" or self.transform == "bucketize"


class Task(_Strict):
    name: Identifier
    label: str = Field(description="expression over raw columns, e.g. \"income == '50000+'\"")
    type: Literal["binary", "regression"] = "binary"
    weight: float = Field(1.0, gt=0)

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        try:
            compile_expression(v)
        except ExpressionError as exc:
            raise ValueError(str(exc)) from None
        return v

    @property
    def label_columns(self) -> frozenset[str]:
        return compile_expression(self.label).columns


class DatasetSource(_Strict):
    """Which reader turns the raw data directory into train/valid/test splits."""

    source: Literal["census", "synthetic", "criteo_like", "files"]
    options: dict[str, Any] = Field(default_factory=dict)


class FeatureSpec(_Strict):
    name: Identifier  # used in paths and experiment names: no `/`, no `..`
    description: str = ""
    dataset: DatasetSource | None = None
    keys: list[str] = Field(default_factory=list, description="raw columns passed through to outputs")
    group_key: str | None = Field(
        None,
        description="one of `keys` (e.g. user_id): binary tasks also report GAUC, the AUC within each of "
        "its groups weighted by the group's rows, and training may select on it (train.selection_metric)",
    )
    history: HistorySpec | None = Field(None, description="point-in-time features computed from the event log")
    features: list[Feature] = Field(min_length=1)
    tasks: list[Task] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _history_features(cls, raw: Any) -> Any:
        """The history section's columns join the features, so everything downstream (fitting,
        encoding, the model, serving) treats them like any declared feature."""
        if not isinstance(raw, dict) or raw.get("history") is None:
            return raw
        history = HistorySpec.model_validate(raw["history"])
        declared = {f.get("name") for f in raw.get("features") or [] if isinstance(f, dict)}
        added = [f for f in history.features() if f["name"] not in declared]
        return {**raw, "history": history, "features": [*(raw.get("features") or []), *added]}

    @model_validator(mode="after")
    def _unique(self) -> FeatureSpec:
        if self.group_key is not None and self.group_key not in self.keys:
            raise ValueError(f"group_key: {self.group_key!r} must be one of keys {self.keys}")
        for kind, names in (("feature", [f.name for f in self.features]), ("task", [t.name for t in self.tasks])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {kind} names: {dupes}")
        return self

    @property
    def sparse_features(self) -> list[Feature]:
        return [f for f in self.features if f.is_sparse]

    @property
    def dense_features(self) -> list[Feature]:
        return [f for f in self.features if not f.is_sparse]

    @property
    def raw_columns(self) -> list[str]:
        """Every raw column the spec reads, in a stable order."""
        cols = list(self.keys) + [f.source_column for f in self.features]
        for t in self.tasks:
            cols += sorted(t.label_columns)
        return list(dict.fromkeys(cols))

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def input_columns(self) -> list[str]:
        """The raw columns a model scores from: every feature's source, no keys and no labels."""
        return list(dict.fromkeys(f.source_column for f in self.features))

    def digest(self) -> str:
        """A stable hash of the spec's content, recorded in manifests and runs."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _format_errors(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        path = ""
        node: Any = raw
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
                name = node[part].get("name") if isinstance(node, list) and isinstance(node[part], dict) else None
                if name:
                    path += f" ({name!r})"
            else:
                path += f".{part}" if path else str(part)
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {path or '<spec>'}: {msg}")
    return "\n".join(lines)


def parse_spec(raw: Any, origin: str = "<spec>") -> FeatureSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: a spec must be a mapping with 'name', 'features' and 'tasks'")
    try:
        return FeatureSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{origin}: invalid feature spec\n{_format_errors(exc, raw)}") from None


def _bundled_specs() -> Path:
    """The specs shipped with recsys-moe: package data (`recsys_moe/specs/`) in an installed
    wheel; in a source checkout, the top-level `features/specs/` the wheel is built from."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "specs"
    return installed if installed.is_dir() else package.parent / "features" / "specs"


BUNDLED_SPECS = _bundled_specs()


def resolve_spec_path(name_or_path: str | Path) -> Path:
    """Accept a path, or the name of a spec shipped in features/specs (e.g. 'census_group1')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_SPECS / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    shipped = sorted(p.stem for p in BUNDLED_SPECS.glob("*.yaml"))
    raise SpecError(f"{name_or_path}: spec file not found (bundled specs: {', '.join(shipped)})")


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read YAML, resolving `extends: other.yaml` (top-level keys of this file win)."""
    if path.resolve() in seen:
        raise SpecError(f"{path}: 'extends' forms a cycle")
    raw = load_yaml(path, SpecError)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a mapping with 'name', 'features' and 'tasks'")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    base_path = path.parent / str(base)
    if not inside(base_path, path.parent):
        raise SpecError(f"{path}: extends: {base!r} is not a file beside the spec (no paths that leave its folder)")
    if not base_path.is_file():
        raise SpecError(f"{path}: extends: {base_path} not found")
    return {**_read_raw(base_path, (*seen, path.resolve())), **raw}


def load_spec(name_or_path: str | Path) -> FeatureSpec:
    path = resolve_spec_path(name_or_path)
    return parse_spec(_read_raw(path), str(path))
