from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys_moe.features.spec import parse_spec
from recsys_moe.pipelines.build import RejectRateError, build_frames, load_state
from recsys_moe.pipelines.fit import stable_hash_ids, stable_hash_lists
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.pipelines.validate import SchemaError

from .conftest import census_dir

SPEC = parse_spec(
    {
        "name": "shop",
        "keys": ["event_id"],
        "features": [
            {"name": "user", "column": "user_id", "kind": "categorical", "embedding_dim": 4, "vocab": {"min_count": 2}},
            {"name": "brand", "kind": "categorical", "embedding_dim": 4, "vocab": {"kind": "hash", "buckets": 16}},
            {"name": "tags", "kind": "multi_hot", "separator": "|", "embedding_dim": 4, "max_length": 3},
            {"name": "price", "kind": "dense", "transform": "log1p", "min": 0},
            {"name": "age", "kind": "dense", "transform": "standardize", "min": 0, "max": 120, "nullable": False},
            {
                "name": "age_b",
                "column": "age",
                "kind": "dense",
                "transform": "bucketize",
                "num_buckets": 4,
                "embedding_dim": 4,
            },
        ],
        "tasks": [
            {"name": "click", "label": "clicked"},
            {"name": "revenue", "label": "revenue", "type": "regression", "weight": 0.5},
        ],
    }
)


def _rows(n: int, start: int = 0) -> dict[str, list]:
    return {
        "event_id": list(range(start, start + n)),
        "user_id": [f"u{i % 5}" for i in range(n)],
        "brand": [f"b{i % 7}" for i in range(n)],
        "tags": ["a|b" if i % 2 else "c" for i in range(n)],
        "price": [str(1.5 * i) for i in range(n)],
        "age": [20.0 + i % 50 for i in range(n)],
        "clicked": [i % 2 for i in range(n)],
        "revenue": [float(i % 3) for i in range(n)],
    }


def _bad_train() -> pl.DataFrame:
    good = pl.DataFrame(_rows(40))
    bad = pl.DataFrame(
        {
            "event_id": [100, 101, 102, 103, 104, 105],
            "user_id": ["u1"] * 6,
            "brand": ["b1"] * 6,
            "tags": ["a"] * 6,
            "price": ["abc", "1", "1", "1", "1", "-3"],
            "age": [30.0, None, 200.0, 30.0, 30.0, 30.0],
            "clicked": [1, 1, 1, 2, 1, 1],
            "revenue": [1.0, 1.0, 1.0, 1.0, None, 1.0],
        }
    )
    return pl.concat([good, bad])


def test_counts_reconcile_and_rejects_name_the_field(tmp_path: Path) -> None:
    raw = {"train": _bad_train(), "valid": pl.DataFrame(_rows(10, 500)), "test": pl.DataFrame(_rows(10, 900))}
    manifest = build_frames(raw, SPEC, tmp_path / "ds", "test", max_reject_rate=0.5, progress=False)
    train = manifest.splits["train"]
    assert (train.rows_in, train.rows_out, train.rows_rejected) == (46, 40, 6)
    for info in manifest.splits.values():
        assert info.rows_in == info.rows_out + info.rows_rejected
        assert sum(pl.read_parquet(tmp_path / "ds" / s).height for s in info.shards) == info.rows_out
    rejects = pl.read_parquet(tmp_path / "ds" / train.rejects)
    assert rejects.height == 6
    reasons = dict(zip(rejects["event_id"], rejects["_reject_reason"]))
    assert reasons[100] == "price: not a number (abc)"
    assert reasons[101] == "age: null in a non-nullable feature"
    assert reasons[102].startswith("age: 200.0 is above the maximum 120")
    assert reasons[103].startswith("label click: 2.0 is not 0/1")
    assert reasons[104] == "label revenue: null or not a number"
    assert reasons[105].startswith("price: -3.0 is below the minimum 0")
    assert sum(train.reject_reasons.values()) == 6
    assert manifest.splits["valid"].rows_rejected == 0 and manifest.splits["valid"].rejects is None
    # The manifest written to disk says the same.
    assert Manifest.load(tmp_path / "ds").splits["train"].rows_rejected == 6


def test_reject_rate_limit_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(RejectRateError, match=r"train: 6 of 46 rows rejected .*price: not a number"):
        build_frames({"train": _bad_train()}, SPEC, tmp_path / "ds", "test", max_reject_rate=0.05, progress=False)
    assert not (tmp_path / "ds").exists()  # nothing half-written


def test_missing_column_is_a_schema_error(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"missing: \['revenue'\]"):
        build_frames({"train": pl.DataFrame(_rows(5)).drop("revenue")}, SPEC, tmp_path / "ds", "t", progress=False)


def test_oov_rare_unseen_and_null_values_map_to_row_zero(tmp_path: Path) -> None:
    train = pl.DataFrame(_rows(40)).with_columns(
        pl.when(pl.col("event_id") == 0).then(pl.lit("rare")).otherwise(pl.col("user_id")).alias("user_id")
    )
    valid = pl.DataFrame(_rows(4, 100)).with_columns(
        user_id=pl.Series(["u1", "never_seen", None, "rare"]),
        tags=pl.Series(["a|zzz", "zzz", None, "b|a|c|a"]),
        brand=pl.Series(["b1", "b1", None, "new_brand"]),
    )
    manifest = build_frames({"train": train, "valid": valid}, SPEC, tmp_path / "ds", "t", progress=False)
    state = load_state(manifest)
    assert "rare" not in state.vocabularies["user"]  # seen once, min_count 2
    out = pl.read_parquet(manifest.shard_paths("valid")[0]).sort("key:event_id")
    assert out["user"].to_list()[1:] == [0, 0, 0]
    assert out["user"][0] == state.vocabularies["user"].index("u1") + 1
    tags = out["tags"].to_list()
    assert tags[0][1] == 0 and tags[1] == [0] and tags[2] == [] and len(tags[3]) == 3  # max_length 3
    brands = out["brand"].to_list()
    assert brands[0] == brands[1] != 0 and brands[2] == 0 and 1 <= brands[3] <= 16
    info = {f.name: f for f in manifest.sparse_features}
    assert info["user"].num_embeddings == len(state.vocabularies["user"]) + 1
    assert info["brand"].num_embeddings == 17
    for name in ("user", "brand", "age_b"):
        assert out[name].max() < info[name].num_embeddings
    # Dense statistics are fitted on train and recorded in the manifest itself.
    assert set(manifest.statistics) == {"price", "age", "age_b"}
    assert manifest.statistics["age"]["t_mean"] == pytest.approx(train["age"].mean())


def test_stable_hash_is_stable() -> None:
    ids = stable_hash_ids(pl.Series(["apple", "pear", None, "apple"]), 1000).to_list()
    assert ids[0] == ids[3] and ids[2] == 0
    # Pinned values: a change here would silently remap every hashed feature of deployed models.
    assert ids[:2] == stable_hash_ids(pl.Series(["apple", "pear"]), 1000).to_list()
    assert (
        stable_hash_ids(pl.Series(["apple"]), 1000)[0]
        == 1 + int.from_bytes(__import__("hashlib").blake2b(b"apple", digest_size=8).digest(), "little") % 1000
    )


def test_hashed_lists_hash_each_element_like_single_values() -> None:
    """The multi-hot hash runs once over all rows' values: same ids as hashing each element."""
    lists = pl.Series("h", [["a", "b"], [], None, ["c", "a"], ["b"]], dtype=pl.List(pl.String))
    got = stable_hash_lists(lists, 97).to_list()
    one = {v: stable_hash_ids(pl.Series([v]), 97)[0] for v in "abc"}
    assert got == [[one["a"], one["b"]], [], [], [one["c"], one["a"]], [one["b"]]]
    assert stable_hash_lists(pl.Series("h", [], dtype=pl.List(pl.String)), 97).to_list() == []


def test_rebuild_is_idempotent(synthetic_raw: Path, tmp_path: Path) -> None:
    from recsys_moe.features import load_spec
    from recsys_moe.pipelines.build import build

    first = build(load_spec("synthetic"), synthetic_raw, tmp_path / "ds", progress=False)
    second = build(load_spec("synthetic"), synthetic_raw, tmp_path / "ds", progress=False)
    assert first.digest == second.digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp or old copies left


def test_the_same_rows_give_the_same_shard_bytes(tmp_path: Path) -> None:
    """The dataset digest names the data: however Polars happened to chunk the frame in memory
    (its parallel execution varies it run to run on large inputs), the shards' bytes are equal."""
    from recsys_moe.pipelines.build import ROW_GROUP, _write_shards

    rows = pl.DataFrame({"id": range(ROW_GROUP + 5000), "x": [0.5] * (ROW_GROUP + 5000)})
    pieces = pl.concat([rows.slice(0, 1000), rows.slice(1000, 70_000), rows.slice(71_000)], rechunk=False)
    assert pieces.n_chunks() == 3
    one = _write_shards(rows, tmp_path / "one", 200_000)
    three = _write_shards(pieces, tmp_path / "three", 200_000)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in three]


def test_synthetic_dataset_is_split_by_time(synthetic_manifest: Manifest) -> None:
    frames = {s: pl.read_parquet(synthetic_manifest.shard_paths(s)) for s in ("train", "valid", "test")}
    assert all(f.height > 0 for f in frames.values())
    assert synthetic_manifest.dense_features == ["position", "price", "age", "item_age_days", "signup_days"]
    assert abs(frames["train"]["price"].mean()) < 0.05 and abs(frames["train"]["price"].std() - 1) < 0.05
    assert [t.name for t in synthetic_manifest.tasks] == ["click", "conversion"]


@pytest.mark.data
def test_census_follows_the_paper_split(tmp_path: Path) -> None:
    if not (census_dir() / "census-income.data.gz").exists():
        pytest.skip("../shared/data/census-income not present")
    from recsys_moe.features import load_spec
    from recsys_moe.pipelines.build import build

    manifest = build(load_spec("census_group1"), census_dir(), tmp_path / "census", progress=False)
    rows = {s: (i.rows_in, i.rows_out) for s, i in manifest.splits.items()}
    assert rows == {"train": (199_523, 199_523), "valid": (49_881, 49_881), "test": (49_881, 49_881)}
    rates = {t.name: t.train_mean for t in manifest.tasks}
    assert rates["income"] == pytest.approx(12_382 / 199_523)
    assert rates["never_married"] == pytest.approx(86_485 / 199_523)


def test_list_columns_with_null_elements(tmp_path: Path) -> None:
    raw = SPEC.model_dump(mode="json")
    raw["features"][2].pop("separator")  # tags arrive as a real list column
    spec = parse_spec(raw)
    train = pl.DataFrame(_rows(6)).with_columns(
        tags=pl.Series([["a", None, "b"], [None], None, ["a"], ["b", "a"], []], dtype=pl.List(pl.String))
    )
    manifest = build_frames({"train": train}, spec, tmp_path / "ds", "t", progress=False)
    tags = pl.read_parquet(manifest.shard_paths("train")[0]).sort("key:event_id")["tags"].to_list()
    assert [len(t) for t in tags] == [2, 0, 0, 1, 2, 0]
    assert all(v is not None and v > 0 for t in tags for v in t)


def test_vocabulary_ids_are_one_plus_the_position_and_oov_for_the_rest() -> None:
    """The Enum behind `_vocab_ids` starts with a string its vocabulary lacks: even a vocabulary
    holding NUL strings, and inputs equal to them, map as the position rule says."""
    from recsys_moe.pipelines.transform import _vocab_ids

    vocab = ["a", "\x00", "\x00\x00", "b"]
    values = pl.Series("v", ["b", "\x00", "zzz", None, "a", "\x00\x00", "\x00\x00\x00"])
    ids = pl.select(_vocab_ids(pl.lit(values), vocab)).to_series()
    assert ids.dtype == pl.Int64
    assert ids.to_list() == [4, 2, 0, 0, 1, 3, 0]
    lists = pl.DataFrame({"l": [["a", "zzz", "b"], []]}).select(pl.col("l").list.eval(_vocab_ids(pl.element(), vocab)))
    assert lists["l"].to_list() == [[1, 0, 4], []]
