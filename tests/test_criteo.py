"""Tests for the Criteo-like synthetic source, its spec, and embedding memory reporting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys_moe.features import load_spec
from recsys_moe.pipelines.manifest import Manifest, SparseFeatureInfo
from recsys_moe.pipelines.sources.criteo import (
    CATEGORICAL_COLUMNS,
    DEFAULT_CARDINALITIES,
    CriteoConfig,
    dense_columns,
    generate,
    read,
    sample_power_law,
    write,
)

SMALL = CriteoConfig(n_rows=20_000, n_days=5, seed=3, history_max_length=8)


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    return generate(SMALL)


@pytest.fixture(scope="module")
def manifest(frame: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    from recsys_moe.pipelines.build import build

    raw = tmp_path_factory.mktemp("criteo_raw")
    write(frame, raw)
    return build(load_spec("criteo_like"), raw, tmp_path_factory.mktemp("ds") / "criteo", progress=False)


def test_deterministic_per_seed(frame: pl.DataFrame) -> None:
    assert generate(SMALL).equals(frame)
    assert not generate(dataclasses.replace(SMALL, seed=4)).equals(frame)


def test_columns_and_values(frame: pl.DataFrame) -> None:
    assert frame.height == SMALL.n_rows
    assert frame["ts"].is_sorted()
    assert frame["ts"].dt.date().n_unique() == SMALL.n_days
    for col, card in zip(CATEGORICAL_COLUMNS, DEFAULT_CARDINALITIES):
        assert frame[col].dtype == pl.Utf8 and frame[col].null_count() == 0
        ids = frame[col].cast(pl.Int64)
        assert ids.min() >= 0 and ids.max() < card
    for col in dense_columns(13):
        assert frame[col].dtype == pl.Int64 and frame[col].min() >= 0
    assert 0 < frame.select(pl.col(dense_columns(13)).null_count()).sum_horizontal().item() < frame.height * 13 / 2
    lengths = frame["history"].list.len()
    assert lengths.min() == 0 and lengths.max() == SMALL.history_max_length
    assert frame["history"].explode().drop_nulls().cast(pl.Int64).max() < SMALL.cardinality("C1")
    ctr = frame["click"].mean()
    assert 0.06 < ctr < 0.2, ctr


def test_power_law_ids(frame: pl.DataFrame) -> None:
    counts = frame["C3"].value_counts(sort=True)["count"].to_numpy()
    # Top 1% of the observed ids carry a large share of rows.
    assert counts[: max(1, len(counts) // 100)].sum() / frame.height > 0.4
    # Frequency of rank r falls like r^-a: fit the slope on log-log over ranks 1..100.
    r = np.arange(1, 101)
    slope = np.polyfit(np.log(r), np.log(counts[:100]), 1)[0]
    assert -1.4 < slope < -0.8, slope


def test_sampler_spans_ten_million() -> None:
    ranks = sample_power_law(np.random.default_rng(0), 10_000_000, 1_000_000, 1.1)
    assert ranks.min() == 0 and ranks.max() < 10_000_000
    assert ranks.max() > 5_000_000
    assert len(np.unique(ranks)) > 100_000
    # P(rank 10) / P(rank 100) ~ 10^1.1 (the continuous approximation is loosest at ranks 1-3).
    assert np.mean(ranks == 9) / np.mean(ranks == 99) == pytest.approx(10**1.1, rel=0.15)


def test_write_and_read_round_trip(frame: pl.DataFrame, tmp_path: Path) -> None:
    events = write(frame, tmp_path)
    days = sorted(p.name for p in events.glob("day=*"))
    assert len(days) == SMALL.n_days and all((events / d / "part-0.parquet").exists() for d in days)
    assert read(tmp_path).collect().equals(frame)


def test_pipeline_builds_with_hashed_ten_million_tables(manifest: Manifest) -> None:
    for info in manifest.splits.values():
        assert info.rows_rejected == 0
    assert sum(info.rows_out for info in manifest.splits.values()) == SMALL.n_rows
    rows = {f.name: f.num_embeddings for f in manifest.sparse_features}
    for col, card in zip(CATEGORICAL_COLUMNS, DEFAULT_CARDINALITIES):
        if card >= 1_000_000:
            assert rows[col] == card + 1
        else:
            assert rows[col] <= card + 1
    assert rows["C3"] == rows["C12"] == rows["C21"] == 10_000_001
    assert 0.06 < manifest.tasks[0].train_mean < 0.2


def test_embedding_memory(manifest: Manifest) -> None:
    from recsys_moe.model.embeddings import embedding_memory_bytes, embedding_memory_per_rank

    expected = sum(f.num_embeddings * f.embedding_dim * 4 for f in manifest.sparse_features)
    assert embedding_memory_bytes(manifest) == expected
    assert embedding_memory_bytes(manifest.sparse_features) == expected
    assert 3 * 10_000_001 * 4 * 4 < expected < 700 * 2**20  # three 10M x 4 tables dominate
    per_rank = embedding_memory_per_rank(manifest, 4)
    assert sum(per_rank) == expected and len(per_rank) == 4
    assert max(per_rank) >= 10_000_001 * 4 * 4
    tiny = [SparseFeatureInfo(name="a", kind="categorical", num_embeddings=10, embedding_dim=2, pooling="sum")]
    assert embedding_memory_bytes(tiny) == 80


def test_tiny_model_forward_backward(manifest: Manifest) -> None:
    from recsys_moe.config import ModelConfig
    from recsys_moe.data.loader import InMemoryDataset
    from recsys_moe.model.ranker import MultiTaskRanker

    torch.manual_seed(0)
    model = MultiTaskRanker(
        manifest,
        ModelConfig(num_experts=2, expert_hidden=[16], tower_hidden=[8]),
        fused_optimizer=("sgd", {"lr": 0.1}),
    )
    data = InMemoryDataset.from_split(manifest, "train", model.sparse.keys, model.task_names)
    batch = data.batch(torch.arange(256))
    out = model(batch.dense, batch.sparse)
    assert out.logits.shape == (256, 1) and torch.isfinite(out.logits).all()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels.float().view_as(out.logits))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
