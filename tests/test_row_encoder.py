"""The endpoint's fast path (`scoring.rows`) against the general path (`Scorer.score` of a frame).

The fast path must give the same scores (within 1e-6) on every row it accepts, and must hand
back (None) every batch the general path would reject a row of, so rejects keep one source.
The spec here is the synthetic one plus a feature of each kind it lacks: a hashed multi-hot, a
separated-string multi-hot, a non-nullable categorical and dense, an untransformed dense value.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_moe.config import ModelConfig
from recsys_moe.features.spec import load_spec, parse_spec
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.build import build, load_state
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.scoring import Scorer
from recsys_moe.scoring.rows import RowEncoder
from recsys_moe.serving.schemas import RequestModels, request_models
from recsys_moe.training import checkpoint

Rows = list[dict[str, Any]]
EXTRA = [
    {"name": "interests_hashed", "column": "interests", "kind": "multi_hot", "embedding_dim": 4, "max_length": 3,
     "vocab": {"kind": "hash", "buckets": 64}},
    {"name": "category_parts", "column": "category", "kind": "multi_hot", "embedding_dim": 4, "separator": "_",
     "max_length": 2},
    {"name": "device_strict", "column": "device", "kind": "categorical", "embedding_dim": 4, "nullable": False},
    {"name": "position_raw", "column": "position", "kind": "dense", "transform": "none"},
    {"name": "price_strict", "column": "price", "kind": "dense", "nullable": False},
]  # fmt: skip


@pytest.fixture(scope="module")
def bundle(synthetic_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (seeded) model over the extended spec: parity needs weights, not skill."""
    raw = load_spec("synthetic").model_dump(mode="json", exclude_none=True)
    raw = copy.deepcopy(raw) | {"name": "synthetic_every_kind"}
    raw["features"] += EXTRA
    spec = parse_spec(raw)
    manifest = build(spec, synthetic_raw, tmp_path_factory.mktemp("ds") / "every_kind", progress=False)
    torch.manual_seed(0)
    config = ModelConfig(arch="mmoe", num_experts=3)
    model = MultiTaskRanker(manifest, config, [t.name for t in spec.tasks])
    directory = tmp_path_factory.mktemp("bundle") / "best"
    weights = checkpoint.state_tensors(model)
    return checkpoint.save_bundle(directory, weights, checkpoint.bundle_config(manifest, config, model, None), manifest)


@pytest.fixture(scope="module")
def scorer(bundle: Path) -> Scorer:
    return Scorer(bundle)


@pytest.fixture(scope="module")
def models(scorer: Scorer) -> RequestModels:
    return request_models(scorer.spec, max_rows=10_000)


def columns(models: RequestModels, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows as the endpoint hands them to the scorer: through the request models."""
    request: Any = models.score.model_validate_json(json.dumps({"rows": rows}))
    return {column: [r.__dict__[f] for r in request.rows] for f, column in models.field_items()}


def both(scorer: Scorer, models: RequestModels, data: dict[str, list[Any]]) -> tuple[np.ndarray | None, Any]:
    return scorer.score_rows(data, len(next(iter(data.values())))), scorer.score(models.frame(data))


@pytest.fixture(scope="module")
def clean(scorer: Scorer, synthetic_manifest: Manifest) -> Rows:
    return read_holdout(synthetic_manifest.raw_path("test")).select(scorer.input_columns).head(400).to_dicts()


def test_clean_rows_take_the_fast_path_with_the_same_scores(scorer: Scorer, models: RequestModels, clean: Rows) -> None:
    data = columns(models, clean)
    fast, general = both(scorer, models, data)
    assert fast is not None, "clean rows must not fall back to the general path"
    assert general.rejects.height == 0
    np.testing.assert_allclose(fast, general.scores, rtol=0, atol=1e-6)


def test_valid_edge_values_take_the_fast_path(scorer: Scorer, models: RequestModels, clean: Rows) -> None:
    """Unseen ids, nulls where allowed, empty and over-long lists, empty separated parts, bounds."""
    rows = [dict(r) for r in clean[:8]]
    rows[0] |= {"user_id": "never-seen", "category": None, "interests": None, "age": None, "price": 0}
    rows[1] |= {"interests": [], "category": "", "brand": "a-brand-never-seen", "position": 1}
    rows[2] |= {"interests": [f"cat_{i:02d}" for i in range(20)], "category": "__x__y_"}
    rows[3] |= {"age": 130, "signup_days": 1e12, "item_age_days": 0, "country": None}
    rows[4] |= {"user_id": 12, "item_id": 7.0, "interests": [1, "cat_03", 2.0]}
    fast, general = both(scorer, models, columns(models, rows))
    assert fast is not None
    assert general.rejects.height == 0
    np.testing.assert_allclose(fast, general.scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        {"age": -1.0},  # below the minimum
        {"age": 131},  # above the maximum
        {"device": None},  # null in the non-nullable device_strict
        {"price": None},  # null in the non-nullable price_strict
        {"position": 0.5},  # below position's minimum of 1
    ],
)
def test_a_row_the_contract_rejects_falls_back(
    scorer: Scorer, models: RequestModels, clean: Rows, change: dict[str, Any]
) -> None:
    rows = [dict(r) for r in clean[:5]]
    rows[3] |= change
    fast, general = both(scorer, models, columns(models, rows))
    assert fast is None
    assert general.rejects["_row"].to_list() == [3]


def test_values_of_other_types_fall_back_rather_than_guess(scorer: Scorer, models: RequestModels, clean: Rows) -> None:
    """Direct callers (not the request models) may pass anything: the fast path reads only the
    types it knows, so a string number or a bool is the contract's to judge."""
    data = columns(models, clean[:4])
    cases = [("age", "40"), ("age", True), ("age", math.nan), ("age", 10**400), ("device", 3), ("interests", "cat_01")]
    for column, value in cases:
        changed = {k: list(v) for k, v in data.items()}
        changed[column][1] = value
        assert scorer.score_rows(changed, 4) is None, (column, value)
    assert scorer.score_rows({k: v[:2] for k, v in data.items()} | {"age": data["age"][:1]}, 2) is None  # ragged


def test_no_rows(scorer: Scorer, models: RequestModels) -> None:
    fast = scorer.score_rows({c.name: [] for c in models.columns}, 0)
    assert fast is not None and fast.shape == (0, len(scorer.tasks))


def _value(kind: str) -> st.SearchStrategy[Any]:
    ids = st.sampled_from(["cat_01", "cat_12", "c04", "m", "f", "ios", "web", "", "_", "never", "12"])
    if kind == "dense":
        return st.one_of(st.none(), st.integers(-5, 200), st.floats(-10, 1e6, allow_nan=False))
    if kind == "categorical":
        return st.one_of(st.none(), ids, st.integers(0, 500))
    if kind == "multi_hot":
        return st.one_of(st.none(), st.lists(st.one_of(ids, st.integers(0, 40)), max_size=12))
    return st.one_of(st.none(), st.builds("_".join, st.lists(ids, max_size=5)))


Batch = tuple[list[dict[str, Any]], dict[str, Any]]


@st.composite
def batches(draw: st.DrawFn, models: RequestModels, clean: Rows) -> Batch:
    """Rows with random values in random columns, and some columns shared by every row (as a
    rank request's context fields that no candidate sets)."""
    rows = [dict(r) for r in draw(st.lists(st.sampled_from(clean), min_size=1, max_size=6))]
    for row in rows:
        for column in draw(st.lists(st.sampled_from(models.columns), max_size=4)):
            row[column.name] = draw(_value(column.kind))
    shared = {c.name: draw(st.one_of(st.just(rows[0][c.name]), _value(c.kind))) for c in draw(st.sets(st.sampled_from(models.columns), max_size=6))}  # fmt: skip
    return rows, shared


def test_random_rows_same_scores_or_a_fallback_the_contract_agrees_with(
    scorer: Scorer, models: RequestModels, clean: Rows
) -> None:
    fell_back = {"n": 0}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(batches(models, clean))
    def check(batch: Batch) -> None:
        rows, shared_raw = batch
        data = columns(models, [r | shared_raw for r in rows])  # as the request models read them
        shared = {c: data[c][0] for c in shared_raw}
        per_row = {c: v for c, v in data.items() if c not in shared}
        fast = scorer.score_rows(per_row, len(rows), shared)
        general = scorer.score(models.frame(data))
        if fast is None:
            fell_back["n"] += 1
            assert general.rejects.height > 0, "fell back on rows the contract accepts"
            return
        assert general.rejects.height == 0, "scored rows the contract rejects"
        np.testing.assert_allclose(fast, general.scores, rtol=0, atol=1e-6)

    check()
    assert 0 < fell_back["n"] < 300  # both branches were exercised


def test_the_encoder_matches_the_frame_path_tensor_for_tensor(
    scorer: Scorer, models: RequestModels, clean: Rows
) -> None:
    """Beyond scores: the same dense matrix and the same KJT the loader builds."""
    from recsys_moe.data.loader import InMemoryDataset

    data = columns(models, clean[:50])
    encoded = RowEncoder(scorer.spec, load_state(scorer.manifest), scorer.model.sparse.keys).encode(data, 50)
    assert encoded is not None
    dense, sparse = encoded
    valid, _ = scorer.validate(models.frame(data))
    expected = InMemoryDataset(scorer.encode(valid), scorer.manifest, scorer.model.sparse.keys, tasks=None)
    batch = expected.batch(torch.arange(50))
    np.testing.assert_allclose(dense.numpy(), batch.dense.numpy(), rtol=0, atol=1e-6)
    assert sparse.keys() == batch.sparse.keys()
    assert torch.equal(sparse.lengths(), batch.sparse.lengths())
    assert torch.equal(sparse.values(), batch.sparse.values())


def test_frame_dtype_of_an_all_null_column_still_encodes(scorer: Scorer, models: RequestModels, clean: Rows) -> None:
    rows = [dict(r) | {"interests": None, "age": None} for r in clean[:3]]
    data = columns(models, rows)
    fast, general = both(scorer, models, data)
    assert fast is not None and general.rejects.height == 0
    np.testing.assert_allclose(fast, general.scores, rtol=0, atol=1e-6)
    assert pl.DataFrame(general.keys).height == 3
