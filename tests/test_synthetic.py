"""Tests for the deterministic synthetic event-log source (small configs, fast)."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_moe.pipelines.sources.synthetic import (
    IMPRESSIONS_SCHEMA,
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    SyntheticConfig,
    SyntheticTables,
    generate,
    generate_day,
    read,
    write,
    write_partitions,
)

SMALL = SyntheticConfig(n_users=800, n_items=400, n_impressions=40_000, n_days=7, n_brands=60, seed=7)


@pytest.fixture(scope="module")
def tables() -> SyntheticTables:
    return generate(SMALL)


def test_deterministic_for_same_seed(tables: SyntheticTables) -> None:
    again = generate(SMALL)
    assert again.users.equals(tables.users)
    assert again.items.equals(tables.items)
    assert again.impressions.equals(tables.impressions)


def test_different_seed_differs(tables: SyntheticTables) -> None:
    other = generate(dataclasses.replace(SMALL, seed=8))
    assert not other.users.equals(tables.users)
    assert not other.items.equals(tables.items)
    assert not other.impressions.equals(tables.impressions)


def test_schemas_exact(tables: SyntheticTables) -> None:
    assert tables.users.schema == USERS_SCHEMA
    assert tables.items.schema == ITEMS_SCHEMA
    assert tables.impressions.schema == IMPRESSIONS_SCHEMA
    assert dict(tables.impressions.schema) == {
        "impression_id": pl.Int64,
        "ts": pl.Datetime("us"),
        "user_id": pl.Int64,
        "item_id": pl.Int64,
        "position": pl.Int32,
        "device": pl.Utf8,
        "click": pl.Int8,
        "conversion": pl.Int8,
        "conversion_ts": pl.Datetime("us"),
        "dwell_seconds": pl.Float64,
    }
    assert tables.users.height == SMALL.n_users
    assert tables.items.height == SMALL.n_items
    assert tables.impressions.height == SMALL.n_impressions


def test_user_values(tables: SyntheticTables) -> None:
    u = tables.users
    assert u["user_id"].to_list() == list(range(SMALL.n_users))
    assert u["age"].min() >= 18 and u["age"].max() <= 80
    assert set(u["gender"].unique()) <= {"f", "m", "u"}
    countries = u["country"].value_counts(sort=True)
    assert set(countries["country"]) <= {f"c{i:02d}" for i in range(20)}
    assert countries["count"][0] > 3 * countries["count"][-1]  # skewed frequencies
    lens = u["interests"].list.len()
    assert lens.min() >= 1 and lens.max() <= 5
    assert (u["interests"].list.n_unique() == lens).all()  # distinct
    cats = {f"cat_{i:02d}" for i in range(SMALL.n_categories)}
    assert set(u["interests"].explode().unique()) <= cats
    assert u["signup_days"].min() >= 0


def test_item_values(tables: SyntheticTables) -> None:
    it = tables.items
    assert it["item_id"].to_list() == list(range(SMALL.n_items))
    assert set(it["category"].unique()) <= {f"cat_{i:02d}" for i in range(SMALL.n_categories)}
    assert set(it["brand"].unique()) <= {f"brand_{i:03d}" for i in range(SMALL.n_brands)}
    assert it["price"].min() > 0
    assert it["item_age_days"].min() >= 0


def test_impression_values_and_labels(tables: SyntheticTables) -> None:
    im = tables.impressions
    assert im["impression_id"].n_unique() == im.height
    assert im["user_id"].is_between(0, SMALL.n_users - 1).all()
    assert im["item_id"].is_between(0, SMALL.n_items - 1).all()
    assert im["position"].is_between(1, 20).all()
    assert set(im["device"].unique()) == {"ios", "android", "web"}
    assert set(im["click"].unique()) <= {0, 1}
    assert set(im["conversion"].unique()) <= {0, 1}
    assert (im["conversion"] <= im["click"]).all()
    assert ((im["dwell_seconds"] > 0) == (im["click"] == 1)).all()
    assert (im.filter(pl.col("click") == 0)["dwell_seconds"] == 0).all()


def test_timestamps_in_range_and_sorted(tables: SyntheticTables) -> None:
    ts = tables.impressions["ts"]
    start = datetime.datetime.combine(SMALL.start_date, datetime.time())
    assert ts.min() >= start
    assert ts.max() < start + datetime.timedelta(days=SMALL.n_days)
    assert ts.is_sorted()
    assert tables.impressions["impression_id"].is_sorted()  # ids follow ts order
    assert ts.dt.date().n_unique() == SMALL.n_days


def test_popularity_and_activity_skew(tables: SyntheticTables) -> None:
    item_counts = np.sort(tables.impressions["item_id"].value_counts()["count"].to_numpy())[::-1]
    top_items = item_counts[: SMALL.n_items // 10].sum()
    assert top_items / SMALL.n_impressions > 0.40
    user_counts = np.sort(tables.impressions["user_id"].value_counts()["count"].to_numpy())[::-1]
    assert user_counts[: SMALL.n_users // 10].sum() / SMALL.n_impressions > 0.25


def test_ctr_and_cvr_ranges(tables: SyntheticTables) -> None:
    im = tables.impressions
    ctr = im["click"].mean()
    cvr = im.filter(pl.col("click") == 1)["conversion"].mean()
    assert 0.05 <= ctr <= 0.15
    assert 0.10 <= cvr <= 0.25


def test_labels_are_learnable(tables: SyntheticTables) -> None:
    df = (
        tables.impressions.join(tables.users, on="user_id")
        .join(tables.items, on="item_id")
        .with_columns(pl.col("interests").list.contains(pl.col("category")).alias("in_interest"))
    )
    by_interest = df.group_by("in_interest").agg(pl.col("click").mean())
    ctr = dict(zip(by_interest["in_interest"], by_interest["click"]))
    assert ctr[True] > 1.5 * ctr[False]

    top = df.filter(pl.col("position") <= 3)["click"].mean()
    bottom = df.filter(pl.col("position") >= 15)["click"].mean()
    assert top > 1.5 * bottom

    clicks = df.filter(pl.col("click") == 1)
    cheap = clicks["price"] <= clicks["price"].median()
    assert clicks.filter(cheap)["conversion"].mean() > clicks.filter(~cheap)["conversion"].mean()


def test_write_read_round_trip(tables: SyntheticTables, tmp_path: Path) -> None:
    paths = write(tables, tmp_path)
    assert set(paths) == {"users", "items", "impressions"}
    assert paths["users"] == tmp_path / "users.parquet" and paths["users"].is_file()
    assert paths["items"] == tmp_path / "items.parquet" and paths["items"].is_file()
    assert paths["impressions"] == tmp_path / "impressions"

    days = sorted(tables.impressions["ts"].dt.date().unique())
    parts = sorted(p.name for p in paths["impressions"].iterdir())
    assert parts == [f"day={d.isoformat()}" for d in days]
    for part in parts:
        assert [p.name for p in (paths["impressions"] / part).iterdir()] == ["part-0.parquet"]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files

    users, items, impressions = read(tmp_path)
    assert isinstance(impressions, pl.LazyFrame)
    assert users.collect().equals(tables.users)
    assert items.collect().equals(tables.items)
    assert impressions.collect().equals(tables.impressions)

    hive = pl.scan_parquet(paths["impressions"], hive_partitioning=True).collect()
    assert hive["day"].n_unique() == len(days)


def test_rewrite_removes_stale_partitions(tables: SyntheticTables, tmp_path: Path) -> None:
    write(tables, tmp_path)
    shorter = generate(SyntheticConfig(n_users=50, n_items=40, n_impressions=500, n_days=2))
    write(shorter, tmp_path)
    assert len(list((tmp_path / "impressions").iterdir())) == 2
    assert read(tmp_path)[2].collect().equals(shorter.impressions)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_users", 0),
        ("n_items", -1),
        ("n_impressions", 0),
        ("n_days", 0),
        ("n_categories", 0),
        ("n_brands", 0),
        ("latent_dim", 0),
        ("seed", -1),
        ("attribution_days", 0),
        ("item_drift", -0.5),
        ("interest_drift", float("nan")),
        ("item_drift", True),
        ("n_users", 1.5),
        ("start_date", "2026-01-01"),
        ("start_date", datetime.datetime(2026, 1, 1, 12)),
    ],
)
def test_config_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


def test_tiny_config_edge_cases() -> None:
    """Degenerate sizes (fewer categories than max interests, one brand) still work."""
    cfg = SyntheticConfig(n_users=1, n_items=1, n_impressions=10, n_days=1, n_categories=2, n_brands=1, latent_dim=1)
    t = generate(cfg)
    assert t.users["interests"].list.len().max() <= 2
    assert t.impressions.height == 10


# --------------------------------------------------------------------------------------------
# conversion times


def _delays(impressions: pl.DataFrame) -> pl.Series:
    return (impressions["conversion_ts"] - impressions["ts"]).drop_nulls()


def test_conversion_ts_null_iff_no_conversion_and_in_window(tables: SyntheticTables) -> None:
    im = tables.impressions
    assert (im["conversion_ts"].is_null() == (im["conversion"] == 0)).all()
    delay = _delays(im)
    assert delay.len() == im["conversion"].sum() > 100
    assert (delay > datetime.timedelta(0)).all()
    assert (delay <= datetime.timedelta(days=SMALL.attribution_days)).all()
    assert datetime.timedelta(hours=1) < delay.median() < datetime.timedelta(hours=8)  # median ~3 h


def test_attribution_days_truncates_delays_and_nothing_else(tables: SyntheticTables) -> None:
    short = generate(dataclasses.replace(SMALL, attribution_days=1)).impressions
    delay = _delays(short)
    assert (delay <= datetime.timedelta(days=1)).all()
    assert delay.max() > datetime.timedelta(hours=12)  # the tail reaches towards the limit ...
    assert (delay == datetime.timedelta(days=1)).sum() <= 1  # ... without piling up on it
    assert short.drop("conversion_ts").equals(tables.impressions.drop("conversion_ts"))


def test_generate_day_carries_conversion_ts(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, n_impressions=5_000)
    day = datetime.date(2026, 3, 4)
    one = generate_day(cfg, day)
    assert one.impressions.schema == IMPRESSIONS_SCHEMA
    assert generate_day(cfg, day).impressions.equals(one.impressions)  # deterministic per day
    im = one.impressions
    assert (im["conversion_ts"].is_null() == (im["conversion"] == 0)).all()
    delay = _delays(im)
    assert delay.len() > 0 and (delay > datetime.timedelta(0)).all()
    assert (delay <= datetime.timedelta(days=cfg.attribution_days)).all()
    write(generate(cfg), tmp_path)
    write_partitions(one, tmp_path)
    back = read(tmp_path)[2].filter(pl.col("ts").dt.date() == day).collect()
    assert back.equals(im)


# --------------------------------------------------------------------------------------------
# temporal drift


def test_drift_changes_labels_only(tables: SyntheticTables) -> None:
    """The dynamics live in their own stream: who saw what, when and where is unchanged."""
    static = generate(dataclasses.replace(SMALL, item_drift=0.0, interest_drift=0.0)).impressions
    context = ["impression_id", "ts", "user_id", "item_id", "position", "device"]
    assert static.select(context).equals(tables.impressions.select(context))
    assert not static["click"].equals(tables.impressions["click"])


def _block_homogeneity(tables: SyntheticTables, cfg: SyntheticConfig, keys: list[str]) -> tuple[float, int]:
    """Pearson chi-square that each group's CTR is the same in 6 equal time blocks → (statistic,
    degrees of freedom). Without drift every row of a group is an iid Bernoulli whatever its
    time (who sees what does not depend on time), so the statistic is ~ chi2(df)."""
    blocks = 6
    start = datetime.datetime.combine(cfg.start_date, datetime.time())
    block = ((pl.col("ts") - start).dt.total_seconds() * blocks // (cfg.n_days * 86_400)).alias("block")
    g = (
        tables.impressions.join(tables.items.select("item_id", "category"), on="item_id")
        .group_by(*keys, block)
        .agg(n=pl.len(), k=pl.col("click").sum())
        .with_columns(
            p=pl.col("k").sum().over(keys) / pl.col("n").sum().over(keys),
            n_blocks=pl.len().over(keys),
            n_min=pl.col("n").min().over(keys),
            clicks=pl.col("k").sum().over(keys),
        )
        # enough rows in every block for the chi-square approximation (chosen on counts, not rates)
        .filter((pl.col("n_blocks") == blocks) & (pl.col("n_min") >= 100) & (pl.col("clicks") >= 50))
    )
    cell = (pl.col("k") - pl.col("n") * pl.col("p")) ** 2 / (pl.col("n") * pl.col("p") * (1 - pl.col("p")))
    groups = g.select(pl.struct(keys).n_unique()).item()
    assert groups >= 40, "too few groups for the test to mean anything"
    return g.select(cell.sum()).item(), groups * (blocks - 1)


DRIFT_CASES = {
    # 60 items seen ~10k times each: item appeal cycles, user interests static
    "item": (
        SyntheticConfig(n_users=2_000, n_items=60, n_impressions=600_000, n_days=30, n_brands=50, interest_drift=0.0),
        ["item_id"],
    ),
    # 30 users x 5 categories with ~4k impressions each: interest cycles, items static
    "user_category": (
        SyntheticConfig(
            n_users=30, n_items=300, n_impressions=600_000, n_days=30, n_categories=5, n_brands=50, item_drift=0.0
        ),
        ["user_id", "category"],
    ),
}


@pytest.mark.parametrize("case", list(DRIFT_CASES))
def test_click_rates_drift_over_time(case: str) -> None:
    """CTRs per item (per user x category) differ between time blocks far beyond chance, and
    the same check on the static model (both drifts 0) stays within chance.

    Chance: a chi2(df) statistic exceeds df + 10 sd (sd = sqrt(2 df)) with probability
    ~1e-12, while the drifting model gives 10-20x that bound (seeds 11-18 checked), so
    neither assertion can fail by bad luck.
    """
    cfg, keys = DRIFT_CASES[case]
    drifting, df = _block_homogeneity(generate(cfg), cfg, keys)
    static_cfg = dataclasses.replace(cfg, item_drift=0.0, interest_drift=0.0)
    static, static_df = _block_homogeneity(generate(static_cfg), static_cfg, keys)
    assert drifting > df + 10 * np.sqrt(2 * df)
    assert static < static_df + 10 * np.sqrt(2 * static_df)
