"""Point-in-time history features: exact against a brute force, no leakage from the future
(a property test), and a day built alone equals the same day of a full build."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_moe.features import load_spec
from recsys_moe.features.history import HistorySpec
from recsys_moe.pipelines.history import add_history, day_path, update_days, write_days

# The bundled spec's history, with short sequences so that truncation happens in small logs.
_BUNDLED = load_spec("synthetic_history").history
assert _BUNDLED is not None
SPEC = _BUNDLED.model_copy(update={"sequences": [_BUNDLED.sequences[0].model_copy(update={"max_length": 4})]})
START = dt.datetime(2026, 1, 1)


def event_log(n: int, seed: int, days: int = 40, users: int = 8, items: int = 12) -> pl.DataFrame:
    """Hour-grained times, so many events tie with each other and with window edges."""
    r = np.random.default_rng(seed)
    ts = [START + dt.timedelta(hours=int(h)) for h in r.integers(0, days * 24, n)]
    click = (r.random(n) < 0.4).astype(np.int8)
    conv = ((r.random(n) < 0.4) & (click == 1)).astype(np.int8)
    delay = r.integers(0, 7 * 24 + 1, n)
    return pl.DataFrame(
        {
            "impression_id": r.permutation(n).astype(np.int64),
            "ts": ts,
            "user_id": r.integers(0, users, n),
            "item_id": r.integers(0, items, n),
            "category": r.choice(["a", "b", "c"], n),
            "click": click,
            "conversion": conv,
            "conversion_ts": [t + dt.timedelta(hours=int(d)) if c else None for t, c, d in zip(ts, conv, delay)],
        },
        schema_overrides={"ts": pl.Datetime("us"), "conversion_ts": pl.Datetime("us")},
    )


def brute_force(frame: pl.DataFrame, spec: HistorySpec) -> list[dict]:
    """Every feature of every row straight from the definitions, with Python loops."""
    rows = frame.sort(["ts", "impression_id"]).to_dicts()
    out = []
    for r in rows:
        t, o = r["ts"], {}
        for entity, keys in spec.entities.items():
            same = [x for x in rows if all(x[k] == r[k] for k in keys)]
            for name, stream in spec.streams.items():
                for w in spec.windows_days:
                    times = [x[stream.time or "ts"] for x in same if stream.flag is None or x[stream.flag] == 1]
                    o[f"{entity}_{name}_{w}d"] = sum(
                        1 for x in times if x is not None and t - dt.timedelta(days=w) <= x < t
                    )
            for name, rate in spec.rates.items():
                for w in spec.windows_days:
                    num, den = o[f"{entity}_{rate.numerator}_{w}d"], o[f"{entity}_{rate.denominator}_{w}d"]
                    o[f"{entity}_{name}_{w}d"] = (num + rate.strength * rate.prior) / (den + rate.strength)
        for seq in spec.sequences:
            lo = t - dt.timedelta(days=max(spec.windows_days))
            clicks = [x for x in rows if x["user_id"] == r["user_id"] and x["click"] == 1 and lo <= x["ts"] < t]
            clicks.sort(key=lambda x: (x["ts"], x["impression_id"]), reverse=True)
            o[seq.name] = [x["item_id"] for x in clicks[: seq.max_length]]
        o["event_hour"], o["event_dow"] = t.hour, t.isoweekday()
        out.append(o)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_feature_matches_the_definition(seed: int) -> None:
    frame = event_log(220, seed)
    got = add_history(frame, SPEC)
    assert got.columns == [*frame.columns, *SPEC.columns()]
    assert (
        got.select("impression_id").to_series().to_list()
        == frame.sort(["ts", "impression_id"])["impression_id"].to_list()
    )
    want = brute_force(frame, SPEC)
    for i, (row, expected) in enumerate(zip(got.select(SPEC.columns()).to_dicts(), want)):
        for col, value in expected.items():
            assert row[col] == pytest.approx(value), f"row {i}, {col}: {row[col]} != {value}"


def _features_until(frame: pl.DataFrame, cut: dt.datetime) -> pl.DataFrame:
    out = add_history(frame, SPEC)
    return out.filter(pl.col("ts") <= cut).select("impression_id", *SPEC.columns()).sort("impression_id")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    cut_hours=st.integers(0, 40 * 24),
    action=st.sampled_from(["flip_labels", "delete", "shift_later", "add", "drop_conversions"]),
    share=st.floats(0.1, 1.0),
)
def test_no_feature_at_or_before_t_depends_on_what_happens_after_t(
    seed: int, cut_hours: int, action: str, share: float
) -> None:
    """Change, delete or add events after t (a conversion after t counts as an event after t,
    even when its impression was before): no feature of a row at or before t may change."""
    frame = event_log(160, seed)
    cut = START + dt.timedelta(hours=cut_hours)
    before = _features_until(frame, cut)
    r = np.random.default_rng(seed + 1)
    after = (pl.col("ts") > cut) & pl.lit(pl.Series(r.random(frame.height) < share))
    if action == "flip_labels":
        changed = frame.with_columns(
            pl.when(after).then(1 - pl.col("click")).otherwise(pl.col("click")).alias("click"),
            pl.when(after).then(pl.col("item_id") + 100).otherwise(pl.col("item_id")).alias("item_id"),
        )
    elif action == "delete":
        changed = frame.filter(~after)
    elif action == "shift_later":  # events after t move further into the future
        changed = frame.with_columns(
            pl.when(after).then(pl.col("ts") + pl.duration(days=3)).otherwise(pl.col("ts")).alias("ts")
        )
    elif action == "add":  # new events after t, some on existing users and items
        offset = cut - START + dt.timedelta(hours=1)
        extra = event_log(80, seed + 2).with_columns(
            pl.col("ts") + offset, pl.col("conversion_ts") + offset, pl.col("impression_id") + 10_000
        )
        changed = pl.concat([frame, extra])
    else:  # conversions that happen after t are withdrawn, whenever their impression was
        late = (pl.col("conversion_ts") > cut).fill_null(False)
        changed = frame.with_columns(
            pl.when(late).then(0).otherwise(pl.col("conversion")).cast(pl.Int8).alias("conversion"),
            pl.when(late).then(None).otherwise(pl.col("conversion_ts")).alias("conversion_ts"),
        )
    assert_frame_equal_exact(before, _features_until(changed, cut))


def assert_frame_equal_exact(a: pl.DataFrame, b: pl.DataFrame) -> None:
    from polars.testing import assert_frame_equal

    assert_frame_equal(a, b, check_exact=True)


def test_a_day_built_alone_equals_the_same_day_of_a_full_build(tmp_path: Path) -> None:
    """Day by day (each from its look-back window only) and all at once give identical files."""
    frame = event_log(900, 5, days=50, users=20, items=30)
    events = frame.lazy()
    days = sorted(set(frame["ts"].dt.date().to_list()))
    write_days(events, SPEC, tmp_path / "full", days, chunk_days=len(days), progress=False)
    write_days(events, SPEC, tmp_path / "daily", days, chunk_days=1, progress=False)
    for d in days:
        a, b = pl.read_parquet(day_path(tmp_path / "full", d)), pl.read_parquet(day_path(tmp_path / "daily", d))
        assert_frame_equal_exact(a, b)
    # The look-back is what day D needs: a day less than the longest window changes some counts.
    late = days[-1]
    start = dt.datetime.combine(late, dt.time())
    short = events.filter(pl.col("ts") >= start - dt.timedelta(days=max(SPEC.windows_days) - 1))
    assert not add_history(short, SPEC, since=start).equals(pl.read_parquet(day_path(tmp_path / "full", late)))


def test_the_look_back_covers_conversions_of_older_impressions(tmp_path: Path) -> None:
    """An impression 36 days before day D that converts 6.5 days later falls inside D's 30-day
    window: day D alone must still read it (look-back = longest window + attribution days)."""
    day = dt.datetime(2026, 3, 1)
    rows = [  # (id, ts, user, item, click, conversion, conversion_ts)
        (1, day - dt.timedelta(days=36), 7, 1, 1, 1, day - dt.timedelta(days=29, hours=12)),
        (2, day + dt.timedelta(hours=9), 7, 2, 0, 0, None),
    ]
    frame = pl.DataFrame(
        rows,
        schema={
            "impression_id": pl.Int64,
            "ts": pl.Datetime("us"),
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "click": pl.Int8,
            "conversion": pl.Int8,
            "conversion_ts": pl.Datetime("us"),
        },
        orient="row",
    )
    frame = frame.with_columns(pl.lit("a").alias("category"))
    write_days(frame.lazy(), SPEC, tmp_path, [day.date()], progress=False)
    built = pl.read_parquet(day_path(tmp_path, day.date()))
    assert built["user_conversions_30d"].to_list() == [1] and built["user_clicks_30d"].to_list() == [0]


def test_update_computes_only_the_missing_days(tmp_path: Path) -> None:
    frame = event_log(400, 6, days=20)
    first = frame.filter(pl.col("ts") < START + dt.timedelta(days=15))
    computed = update_days(first.lazy(), SPEC, tmp_path, progress=False)
    assert len(computed) == 15
    stamp = day_path(tmp_path, computed[0]).stat().st_mtime_ns
    computed = update_days(frame.lazy(), SPEC, tmp_path, progress=False)
    assert [d.day for d in computed] == list(range(16, 21))  # only the new days
    assert day_path(tmp_path, dt.date(2026, 1, 1)).stat().st_mtime_ns == stamp
    full = add_history(frame, SPEC).filter(pl.col("ts").dt.day() == 18)
    assert_frame_equal_exact(pl.read_parquet(day_path(tmp_path, dt.date(2026, 1, 18))), full)


def test_history_spec_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="rates.ctr: 'views' is not a stream"):
        HistorySpec.model_validate(
            {
                "entities": {"user": ["u"]},
                "streams": {"clicks": {"flag": "c"}},
                "rates": {"ctr": {"numerator": "clicks", "denominator": "views", "prior": 0.1}},
            }
        )
    with pytest.raises(ValueError, match=r"sequences\[0\].entity: 'item'"):
        HistorySpec.model_validate(
            {
                "entities": {"user": ["u"]},
                "streams": {"clicks": {}},
                "sequences": [{"name": "s", "entity": "item", "value": "i", "stream": "clicks"}],
            }
        )


def test_polars_and_the_pandas_baseline_agree() -> None:
    """benchmarks/pipelines_pandas.py is written independently from the same definitions: the
    two implementations must give the same numbers (it is the baseline of pipelines.md)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pipelines_pandas import pandas_history

    frame = event_log(1500, 9, days=45, users=30, items=40)
    want = pl.from_pandas(pandas_history(frame.to_pandas(), SPEC))
    got = add_history(frame, SPEC).select(want.columns)
    assert want.height == got.height == frame.height
    for col in want.columns:
        if col == "recent_clicks":
            assert got[col].to_list() == want[col].to_list()
        else:
            assert np.allclose(got[col].to_numpy().astype(float), want[col].to_numpy().astype(float)), col
