"""Request models built from a model's feature spec, and the (static) response models.

The row model is generated from the spec with `create_model`, so the endpoint validates the
fields the loaded model actually reads (and documents them in OpenAPI): an unknown field is a
422 that names it, a wrong type is a 422 that names the field and what it expects. Values are
checked here only for type; ranges and nullability are the Scorer's checks (the same ones the
training pipeline applied), so there is one definition of a valid row.

Field names are raw column names, which need not be Python identifiers, so every field has a
safe internal name (`f0`, `f1`, ...) and the column as its alias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictFloat,
    StrictInt,
    StrictStr,
    create_model,
)

from recsys_moe.features.spec import Feature, FeatureSpec
from recsys_moe.pipelines.coerce import id_text
from recsys_moe.scoring import RankingConfig

Kind = Literal["categorical", "multi_hot", "multi_hot_text", "dense"]

EXPECTS: dict[str, str] = {
    "dense": "a finite number or null",
    "categorical": "a string, an integer or null",
    "multi_hot": "a list of strings/integers or null",  # integral floats count as integers
    "multi_hot_text": "a string (a separated list) or null",
}
DTYPES: dict[str, pl.DataType] = {
    "dense": pl.Float64(),
    "categorical": pl.String(),
    "multi_hot": pl.List(pl.String()),
    "multi_hot_text": pl.String(),
}


def _as_texts(values: list[str | int | float] | None) -> list[str | None] | None:
    return None if values is None else [id_text(v) for v in values]


# Ids as the input contract (`pipelines.coerce`) reads them in every path: 123 and 123.0 are "123",
# 1.5 is refused. Numbers are strict: an int is accepted, "1.5" and true are not.
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Id = StrictStr | StrictInt | StrictFloat
Category = Annotated[Id | None, AfterValidator(id_text)]
Categories = Annotated[list[Id] | None, AfterValidator(_as_texts)]
TYPES: dict[str, Any] = {
    "dense": Number | None,
    "categorical": Category,
    "multi_hot": Categories,
    "multi_hot_text": StrictStr | None,
}


@dataclass(frozen=True)
class Column:
    """One raw input column: what the request calls it and how it is typed."""

    name: str  # the raw column (the JSON field)
    field: str  # the pydantic field name
    kind: Kind
    features: tuple[str, ...]  # the spec features read from it

    @property
    def expects(self) -> str:
        return EXPECTS[self.kind]


def _list_series(name: str, values: list[list[str] | None]) -> pl.Series:
    """A List(String) column through Arrow offsets: ~6x faster than polars' Python-list
    conversion, which dominated building a 100-row frame."""
    flat: list[str] = []
    offsets = [0]
    for v in values:
        if v is not None:
            flat.extend(v)
        offsets.append(len(flat))
    mask = pa.array([v is None for v in values], pa.bool_())
    array = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.large_string()), mask=mask)
    return pl.Series(name, array, dtype=pl.List(pl.String()))


def _kind(f: Feature) -> Kind:
    if f.kind == "multi_hot" and f.separator is not None:
        return "multi_hot_text"
    return f.kind


def _describe(column: str, features: list[Feature]) -> str:
    parts = []
    for f in features:
        text = f"{f.kind} feature {f.name!r}"
        if f.min is not None or f.max is not None:
            text += f" in [{f.min if f.min is not None else '-inf'}, {f.max if f.max is not None else 'inf'}]"
        if f.kind == "multi_hot":
            text += f" (first {f.max_length} values kept" + (f", split on {f.separator!r})" if f.separator else ")")
        parts.append(text + ("" if f.nullable else ", must not be null"))
    return f"{column}: " + "; ".join(parts) + ". Missing means null; unseen categories score as out-of-vocabulary."


@dataclass(frozen=True)
class RequestModels:
    """The request models and frame layout for one feature spec, built once per loaded model."""

    columns: tuple[Column, ...]
    row: type[BaseModel]
    score: type[BaseModel]
    rank: type[BaseModel]
    by_feature: dict[str, str]  # feature name → raw column (reject reasons name the feature)

    def field_items(self) -> list[tuple[str, str]]:
        """(pydantic field, raw column) pairs, in frame order."""
        return [(c.field, c.name) for c in self.columns]

    def frame(self, data: dict[str, list[Any]]) -> pl.DataFrame:
        """Validated column values → the Scorer's input frame, with dtypes fixed by the spec (a
        column of nulls is still Float64/String/List(String))."""
        return pl.DataFrame(
            [
                _list_series(c.name, data[c.name])
                if c.kind == "multi_hot"
                else pl.Series(c.name, data[c.name], dtype=DTYPES[c.kind])
                for c in self.columns
            ]
        )

    def json_schemas(self) -> dict[str, Any]:
        """OpenAPI component schemas for the request bodies (and what they reference)."""
        out: dict[str, Any] = {}
        for model in (self.score, self.rank):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
            out.update(schema.pop("$defs", {}))
            out[model.__name__] = schema
        return out


def request_models(spec: FeatureSpec, max_rows: int) -> RequestModels:
    """Build the row, score-request and rank-request models for `spec`."""
    grouped: dict[str, list[Feature]] = {}
    for f in spec.features:
        grouped.setdefault(f.source_column, []).append(f)
    columns: list[Column] = []
    fields: dict[str, Any] = {}
    for i, (name, features) in enumerate(grouped.items()):
        kind = _kind(features[0])  # columns shared by features (age and its buckets) share a kind in practice
        column = Column(name=name, field=f"f{i}", kind=kind, features=tuple(f.name for f in features))
        columns.append(column)
        extra: dict[str, Any] = {}
        lows = [f.min for f in features if f.min is not None]
        highs = [f.max for f in features if f.max is not None]
        if kind == "dense" and lows:
            extra["minimum"] = max(lows)
        if kind == "dense" and highs:
            extra["maximum"] = min(highs)
        fields[column.field] = (
            TYPES[kind],
            Field(None, alias=name, title=name, description=_describe(name, features), json_schema_extra=extra or None),
        )
    row: Any = create_model(  # a class made at runtime: typed Any so list[row] and row | None check
        "FeatureRow",
        __config__=ConfigDict(extra="forbid", populate_by_name=False),
        __doc__=f"One row of raw features for spec {spec.name!r}: a field per input column.",
        **fields,
    )
    score = create_model(
        "ScoreRequest",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Rows to score, in order; each gets one score per task.",
        rows=(list[row], Field(max_length=max_rows, description=f"at most {max_rows} rows")),
    )
    rank = create_model(
        "RankRequest",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Candidates to rank for one context: each row is the context merged with a candidate "
        "(a field the candidate sets, even to null, wins).",
        context=(row | None, Field(None, description="fields shared by every candidate, e.g. the user's")),
        candidates=(list[row], Field(max_length=max_rows, description=f"at most {max_rows} candidates")),
        ranking=(RankingConfig | None, Field(None, description="override the server's ranking for this request")),
        top_k=(int | None, Field(None, ge=1, description="return only the best top_k candidates")),
    )
    return RequestModels(
        columns=tuple(columns),
        row=row,
        score=score,
        rank=rank,
        by_feature={f.name: f.source_column for f in spec.features},
    )


# -- responses (static: documented in OpenAPI, built by hand for speed) -------------------------
class ModelRef(BaseModel):
    name: str
    version: str
    run_id: str | None = None


class ScoreResponse(BaseModel):
    model: ModelRef
    tasks: list[str]
    scores: list[dict[str, float]] = Field(description="one {task: score} per request row, in request order")


class RankedCandidate(BaseModel):
    index: int = Field(description="the candidate's position in the request")
    score: float = Field(description="the combined ranking score the list is sorted by")
    scores: dict[str, float] = Field(description="per-task scores")


class RankResponse(BaseModel):
    model: ModelRef
    tasks: list[str]
    ranking: RankingConfig
    candidates: list[RankedCandidate] = Field(description="best first (ties keep request order)")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where in the request, e.g. ['body', 'rows', 3, 'age']")
    msg: str
    type: str
    row: int | None = Field(None, description="the row (score) or candidate (rank) index, when one is to blame")
    field: str | None = Field(None, description="the raw field to blame, when there is one")


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong, in one line (the first problem)")
    detail: list[ErrorItem] = Field(default_factory=list)


class ReadyBody(BaseModel):
    ready: bool
    model: dict[str, Any] | None = None
    reason: str | None = None
