from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys_moe.features import load_spec
from recsys_moe.features.expressions import ExpressionError, compile_expression
from recsys_moe.features.spec import SpecError, parse_spec

BASE = {
    "name": "t",
    "features": [{"name": "u", "kind": "categorical", "embedding_dim": 4}],
    "tasks": [{"name": "click", "label": "click"}],
}


def _with(**changes) -> dict:
    spec = {**BASE, **changes}
    return spec


@pytest.mark.parametrize(
    "raw, needle",
    [
        (_with(features=[{"name": "u", "kind": "categorical"}]), "features[0] ('u'): embedding_dim: required"),
        (_with(features=[{"name": "u", "kind": "sparse", "embedding_dim": 4}]), "features[0] ('u').kind"),
        (_with(features=[{"name": "x", "kind": "dense", "transform": "zscore"}]), "features[0] ('x').transform"),
        (_with(features=[{"name": "x", "kind": "dense", "embedding_dim": 4}]), "embedding_dim: only valid"),
        (_with(features=[{"name": "x", "kind": "dense", "min": 3, "max": 1}]), "min (3.0) is greater than max"),
        (
            _with(features=[{"name": "u", "kind": "categorical", "embedding_dim": 4, "vocab": {"kind": "hash"}}]),
            "buckets: required when kind is 'hash'",
        ),
        (
            _with(features=[{"name": "u", "kind": "categorical", "embedding_dim": 0}]),
            "embedding_dim: Input should be greater",
        ),
        (
            _with(features=[{"name": "u", "kind": "categorical", "embedding_dim": 6}]),
            "features[0] ('u'): embedding_dim: 6 is not a multiple of 4",
        ),
        (
            _with(group_key="user_id"),
            "group_key: 'user_id' must be one of keys",
        ),
        (
            _with(features=[{"name": "u", "kind": "categorical", "embedding_dim": 4, "colour": 1}]),
            "features[0] ('u').colour",
        ),
        (_with(tasks=[{"name": "click", "label": "click", "type": "ranking"}]), "tasks[0] ('click').type"),
        (_with(tasks=[{"name": "click", "label": "__import__('os')"}]), "tasks[0] ('click').label: unsupported syntax"),
        (_with(tasks=[{"name": "click", "label": "click", "weight": 0}]), "tasks[0] ('click').weight"),
        (_with(tasks=[]), "tasks: List should have at least 1 item"),
        (_with(features=BASE["features"] * 2), "duplicate feature names: ['u']"),
        (_with(features=[{"name": "bad name", "kind": "dense"}]), "is not an identifier"),
    ],
)
def test_bad_spec_names_the_field(raw: dict, needle: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(raw, "my.yaml")
    assert "my.yaml" in str(err.value)
    assert needle in str(err.value)


def test_missing_file_lists_bundled_specs(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="bundled specs: .*census_group1"):
        load_spec(tmp_path / "nope.yaml")


def test_extends_and_bundled_specs() -> None:
    g1, g2 = load_spec("census_group1"), load_spec("census_group2")
    assert [f.name for f in g1.features] == [f.name for f in g2.features]
    assert [t.name for t in g1.tasks] == ["income", "never_married"]
    assert [t.name for t in g2.tasks] == ["college", "never_married"]
    # The paper removes education and marital status from the inputs.
    inputs = {f.source_column for f in g1.features}
    assert not inputs & {"education", "marital_stat", "income_50k", "instance_weight"}
    assert g1.digest() != g2.digest()
    assert load_spec("synthetic").digest() == load_spec("synthetic").digest()


def test_expressions_compile_to_polars() -> None:
    df = pl.DataFrame({"a": [1.0, 5.0, None], "s": ["x", "y", "z"]})
    expr = compile_expression("a > 2 and s in ['y', 'z']")
    assert expr.columns == {"a", "s"}
    assert df.select(expr.expr).to_series().to_list() == [False, True, None]
    assert df.select(compile_expression("log1p(a) * 2").expr).to_series()[0] == pytest.approx(2 * 0.6931471805599453)
    for bad in ("a.__class__", "open('x')", "a if a else 1", "[a for a in s]", "lambda: 1"):
        with pytest.raises(ExpressionError):
            compile_expression(bad)
