"""Cold start: the out-of-vocabulary row is trained (id dropout), so an unseen id is scored with
a learned vector, not its random initial one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from recsys_moe.config import load_config
from recsys_moe.data.id_dropout import bernoulli_positions, drop_to_oov, oov_rates, step_generator
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.features import load_spec
from recsys_moe.pipelines.build import build
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training.checkpoint import Progress
from recsys_moe.training.trainer import LocalEngine


def _spec_every_id_known(synthetic_raw: Path, tmp_path: Path, oov_rate: float | None) -> Manifest:
    """The synthetic spec with min_count 1 for users and items: no training row maps to OOV by itself."""
    raw = load_spec("synthetic").model_dump(mode="json", exclude_none=True)
    for f in raw["features"]:
        if f["name"] in ("user", "item"):
            f["vocab"] = {"min_count": 1, **({"oov_rate": oov_rate} if oov_rate is not None else {})}
    raw.pop("history", None)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": "every_id_known"}))
    return build(load_spec(path), synthetic_raw, tmp_path / "ds", progress=False)


@pytest.mark.parametrize(("oov_rate", "moves"), [(None, True), (0.0, False)])
def test_oov_rows_move_during_training(
    synthetic_raw: Path, tmp_path: Path, oov_rate: float | None, moves: bool
) -> None:
    manifest = _spec_every_id_known(synthetic_raw, tmp_path, oov_rate)
    config = load_config(None, ["model.pack_tables_below=1", "model.num_experts=2", f"train.checkpoint_dir={tmp_path}"])
    engine = LocalEngine(manifest, config, progress_bar=False)
    train_ids = engine.data["train"].ids[:, engine.data["train"].single_rows["user"]]
    assert (train_ids > 0).all()  # every training user has its own row: only dropout reaches row 0
    tables = engine.ranker.sparse.ebc.embedding_bags
    before = {n: tables[n].weight[0].detach().clone() for n in ("t_user", "t_item")}
    engine.train_epoch(0, Progress(run_id=None, loss_sum=[0.0, 0.0]), bar=False)
    for name, row in before.items():
        assert (not torch.equal(tables[name].weight[0], row)) == moves, name


def test_id_dropout_rate_and_determinism(synthetic_manifest: Manifest) -> None:
    keys = [f.name for f in synthetic_manifest.sparse_features]
    data = InMemoryDataset.from_split(synthetic_manifest, "train", keys, synthetic_manifest.task_names)
    rates = oov_rates(synthetic_manifest.spec, keys)
    assert rates is not None
    by_key = dict(zip(keys, rates.tolist()))
    assert by_key["user"] == pytest.approx(0.02) and by_key["brand"] == 0.0  # fitted vs hashed
    assert by_key["age_bucket"] == 0.0  # a bucketized number: row 0 means null, not unknown
    batch = data.batch(slice(0, len(data)))  # in order: views of the data set
    kept = batch.sparse.values().clone()
    one = drop_to_oov(batch, rates, step_generator(0, 1, 5))
    again = drop_to_oov(batch, rates, step_generator(0, 1, 5))
    other = drop_to_oov(batch, rates, step_generator(0, 1, 6))
    assert torch.equal(batch.sparse.values(), kept)  # the data set is not written
    assert torch.equal(one.sparse.values(), again.sparse.values())
    assert not torch.equal(one.sparse.values(), other.sparse.values())
    per_key = one.sparse.to_dict()
    source = batch.sparse.to_dict()
    for key in keys:
        was, now = source[key].values(), per_key[key].values()
        changed = was != now
        assert (now[changed] == 0).all()
        share = changed.sum().item() / max(int((was != 0).sum()), 1)
        assert share == pytest.approx(by_key[key], abs=0.01), key


def test_id_dropout_thins_each_key_to_its_own_rate(synthetic_manifest: Manifest) -> None:
    """Keys with different non-zero rates: the draw at the highest rate is thinned per key."""
    keys = [f.name for f in synthetic_manifest.sparse_features if f.kind == "categorical"]
    data = InMemoryDataset.from_split(synthetic_manifest, "train", keys, synthetic_manifest.task_names)
    wanted = [0.0, 0.05, 0.2, 0.4][: len(keys)] + [0.1] * max(len(keys) - 4, 0)
    batch = data.batch(slice(0, len(data)))
    changed = {k: 0 for k in keys}
    nonzero = {k: int((jt.values() != 0).sum()) for k, jt in batch.sparse.to_dict().items()}
    for step in range(20):
        dropped = drop_to_oov(batch, torch.tensor(wanted), step_generator(0, 0, step)).sparse.to_dict()
        for k, jt in batch.sparse.to_dict().items():
            changed[k] += int((jt.values() != dropped[k].values()).sum())
    for k, rate in zip(keys, wanted):
        assert changed[k] / (20 * nonzero[k]) == pytest.approx(rate, abs=0.01), k


@pytest.mark.parametrize("p", [1e-4, 0.02, 0.2, 0.3, 0.9])
def test_bernoulli_positions_are_independent_trials(p: float) -> None:
    """The geometric-gap draw has the Bernoulli(p) mean and variance of its count, at every position."""
    g = torch.Generator().manual_seed(0)
    n, runs = 2000, 3000
    hits = torch.zeros(n)
    counts = []
    for _ in range(runs):
        positions = bernoulli_positions(n, p, g)
        assert bool((positions[1:] > positions[:-1]).all())  # sorted, each position once
        assert positions.numel() == 0 or 0 <= int(positions.min()) <= int(positions.max()) < n
        hits[positions] += 1
        counts.append(positions.numel())
    count = torch.tensor(counts, dtype=torch.float64)
    assert float(count.mean()) == pytest.approx(n * p, rel=0.02, abs=0.05)
    assert float(count.var()) == pytest.approx(n * p * (1 - p), rel=0.1, abs=0.05)
    halves = hits[: n // 2].sum() / hits[n // 2 :].sum() if p > 1e-3 else torch.tensor(1.0)
    assert float(halves) == pytest.approx(1.0, abs=0.02)  # no drift along the positions
    assert bernoulli_positions(0, p, g).numel() == 0 and bernoulli_positions(n, 0.0, g).numel() == 0
