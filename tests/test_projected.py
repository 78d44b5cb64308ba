"""The first layer through the table rows (kernels/projected.py): the same model as the lookup,
forward, gradients and the fused embedding update, and used only where it applies."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from recsys_moe.config import load_config
from recsys_moe.kernels.dense import gated_experts_combine
from recsys_moe.kernels.projected import TableLayout, projected_gated_experts_combine
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training import checkpoint
from recsys_moe.training.trainer import LocalEngine

DIM = 4


def _block(d_in: int, num: int = 3, hidden: tuple[int, ...] = (6, 5), gates: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = [(d_in, num, hidden[0])] + [(num, a, b) for a, b in itertools.pairwise(hidden)]
    weights = [torch.randn(s, generator=g) * 0.3 for s in shapes]
    biases = [torch.randn(num, 1, h, generator=g) * 0.1 for h in hidden]
    gate = [torch.randn(gates, d_in, num, generator=g) * 0.3, torch.randn(gates, 1, num, generator=g) * 0.1]
    return [t.requires_grad_() for t in (*weights, *biases, *gate)]


@pytest.mark.parametrize(("batch", "n_dense", "temperature"), [(64, 3, 1.0), (1, 0, 0.5), (7, 2, 2.0)])
def test_projected_block_is_the_dense_block_on_looked_up_rows(batch: int, n_dense: int, temperature: float) -> None:
    """Mixture, gate probabilities and every gradient (the table's as the sum of its looked-up
    rows' gradients) as `gated_experts_combine` on the concatenated rows; a batch of one too."""
    sizes = [5, 1, 9, 3]
    layout = TableLayout.of(sizes, DIM)
    table = torch.randn(sum(sizes), DIM, requires_grad=True)
    ids = torch.stack([torch.randint(0, n, (batch,)) for n in sizes])  # [F, B]
    rows = ids + layout.starts[:, None]
    dense = torch.randn(batch, n_dense)
    params = _block(len(sizes) * DIM + n_dense)
    depth = 2
    weights, biases, (gate_w, gate_b) = params[:depth], params[depth : 2 * depth], params[2 * depth :]

    looked_up = table[rows.t()].reshape(batch, -1)  # [B, F * D], autograd gathers the rows' gradients
    mixed, probs = gated_experts_combine(torch.cat([looked_up, dense], 1), weights, biases, gate_w, gate_b, temperature)
    counts = torch.bincount(rows.reshape(-1), minlength=len(table))
    mixed2, probs2 = projected_gated_experts_combine(
        table, ids, counts, dense, weights, biases, gate_w, gate_b, temperature, layout
    )
    assert mixed2.shape == mixed.shape == (2, batch, 5)
    torch.testing.assert_close(mixed2, mixed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs2, probs, rtol=1e-5, atol=1e-6)

    up = torch.randn_like(mixed)
    up_probs = torch.randn_like(probs)  # a balance loss's gradient reaches the gates too
    inputs = [table, *params]
    want = torch.autograd.grad((mixed * up).sum() + (probs * up_probs).sum(), inputs)
    got = torch.autograd.grad((mixed2 * up).sum() + (probs2 * up_probs).sum(), inputs)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    untouched = counts == 0
    if untouched.any():
        assert torch.equal(got[0][untouched], torch.zeros_like(got[0][untouched]))


@pytest.fixture(scope="module")
def single_id_manifest(synthetic_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """The synthetic data with single-id features of one dimension only: one packed table."""
    from recsys_moe.features import load_spec
    from recsys_moe.features.spec import parse_spec
    from recsys_moe.pipelines.build import build

    raw = load_spec("synthetic").model_dump(mode="json")
    keep = {"category", "brand", "country", "gender", "device", "position", "price", "age"}
    raw["features"] = [f for f in raw["features"] if f["name"] in keep]
    for f in raw["features"]:
        if f["kind"] == "categorical":
            f["embedding_dim"] = 8
        if f["name"] == "brand":
            f["vocab"] = {"kind": "hash", "buckets": 40}
    raw["name"] = "synthetic_single_ids"
    return build(parse_spec(raw), synthetic_raw, tmp_path_factory.mktemp("single") / "ds", progress=False)


def _engine(manifest: Manifest, workdir: Path, *extra: str) -> LocalEngine:
    overrides = [
        "train.batch_size=256",
        "train.max_steps_per_epoch=5",
        "model.num_experts=4",
        f"train.checkpoint_dir={workdir}",
        "tracking.enabled=false",
        "train.threads=1",
        *extra,
    ]
    return LocalEngine(manifest, load_config(None, overrides), progress_bar=False)


@pytest.mark.parametrize(
    ("optimizer", "steps", "table_atol"), [("sgd", 5, 2e-6), ("adagrad", 1, 1e-4), ("rowwise_adagrad", 1, 1e-4)]
)
def test_training_on_rows_is_training_on_the_lookup(
    single_id_manifest: Manifest, tmp_path: Path, optimizer: str, steps: int, table_atol: float
) -> None:
    """Steps from one start on the same batches: the same dense weights, tables and embedding
    optimizer state, up to float rounding, for each fused optimizer; rows no batch touched
    unchanged, bit for bit.

    Adagrad's first step moves an element by lr * g / (|g| + eps): on elements whose gradient
    is near zero that turns rounding into up to ~1e-5 of difference, so its tables are compared
    after one step and more loosely (a wrong row or gradient would differ by ~lr = 0.05)."""
    engines = {}
    for on_rows in (True, False):
        engine = _engine(
            single_id_manifest,
            tmp_path / str(on_rows),
            f"train.first_layer_on_rows={str(on_rows).lower()}",
            f"train.embedding_optimizer={optimizer}",
            f"train.max_steps_per_epoch={steps}",
        )
        assert engine.on_rows is on_rows
        start = {k: v.clone() for k, v in engine.ranker.sparse.state_dict().items()}
        stats = engine.train_epoch(0, checkpoint.Progress(run_id=None, loss_sum=[0.0, 0.0]), bar=False)
        engines[on_rows] = (engine, start, stats)
    rows_engine, start, rows_stats = engines[True]
    plain_engine, plain_start, plain_stats = engines[False]
    assert all(torch.equal(start[k], plain_start[k]) for k in start)  # one start
    assert rows_stats.loss == pytest.approx(plain_stats.loss, rel=1e-5)

    rows_state, plain_state = rows_engine.ranker.state_dict(), plain_engine.ranker.state_dict()
    table = next(k for k in rows_state if k.startswith("sparse.") and k.endswith(".weight"))
    for name, value in plain_state.items():
        atol = table_atol if name == table else 2e-6
        torch.testing.assert_close(rows_state[name], value, rtol=1e-4, atol=atol, msg=name)
    rows_opt = rows_engine.ranker.sparse.fused_optimizer().state_dict()["state"]
    plain_opt = plain_engine.ranker.sparse.fused_optimizer().state_dict()["state"]
    for key, state in plain_opt.items():
        for name, value in state.items():
            torch.testing.assert_close(rows_opt[key][name], value, rtol=1e-4, atol=1e-9, msg=f"{key} {name}")

    before = start[table.removeprefix("sparse.")]
    moved = (rows_state[table] != before).any(dim=1)
    assert moved.any() and not moved.all()  # some rows trained, some untouched
    assert torch.equal(moved, (plain_state[table] != before).any(dim=1))


def test_a_batch_of_one_scores_the_same_on_rows(single_id_manifest: Manifest, tmp_path: Path) -> None:
    engine = _engine(single_id_manifest, tmp_path)
    ranker, data = engine.ranker, engine.data["valid"]
    batch = data.batch(torch.arange(1))
    out, rows = ranker.forward_rows(batch.sparse, batch.dense)
    plain = ranker(batch.dense, batch.sparse)
    assert out.logits.shape == plain.logits.shape == (1, 2)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6)
    assert rows.counts.sum() == len(ranker.sparse.keys)


def test_a_batch_that_is_not_single_ids_in_key_order_is_refused(single_id_manifest: Manifest, tmp_path: Path) -> None:
    from torchrec import KeyedJaggedTensor

    sparse = _engine(single_id_manifest, tmp_path).ranker.sparse
    batch = KeyedJaggedTensor.from_lengths_sync(
        keys=list(reversed(sparse.keys)),
        values=torch.zeros(len(sparse.keys), dtype=torch.int32),
        lengths=torch.ones(len(sparse.keys), dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="in that order"):
        sparse.row_batch(batch)
    # As many ids as samples x features, but two in one bag and none in another.
    lengths = torch.ones(2 * len(sparse.keys), dtype=torch.int32)
    lengths[0], lengths[1] = 2, 0
    two_in_one = KeyedJaggedTensor.from_lengths_sync(
        keys=sparse.keys, values=torch.zeros(2 * len(sparse.keys), dtype=torch.int32), lengths=lengths
    )
    with pytest.raises(ValueError, match="one id per sample and feature"):
        sparse.row_batch(two_in_one)


def test_rows_are_used_only_where_they_apply(
    single_id_manifest: Manifest, synthetic_manifest: Manifest, tmp_path: Path
) -> None:
    """Multi-hot features or tables of several dims, an input norm, PLE, top-k gates, an
    embedding penalty, a batch under twice the largest feature's rows, the switch off: the plain
    lookup. OMoE (one shared gate) trains on rows too."""
    on_rows = _engine(single_id_manifest, tmp_path / "a")
    assert on_rows.on_rows and on_rows.extra_params["first_layer"] == "table rows"  # tracked with the run
    lookup = _engine(synthetic_manifest, tmp_path / "b")
    assert not lookup.on_rows and lookup.extra_params["first_layer"] == "lookup"
    assert not _engine(single_id_manifest, tmp_path / "c", "model.input_norm=layer").on_rows
    assert not _engine(single_id_manifest, tmp_path / "d", "model.arch=ple").on_rows
    assert not _engine(single_id_manifest, tmp_path / "e", "model.gate=topk").on_rows
    assert not _engine(single_id_manifest, tmp_path / "f", "train.embedding_l2=0.1").on_rows
    assert not _engine(single_id_manifest, tmp_path / "g", "train.batch_size=16").on_rows
    assert not _engine(single_id_manifest, tmp_path / "g2", "train.batch_size=81").on_rows  # brand's 41 rows
    assert not _engine(single_id_manifest, tmp_path / "h", "train.first_layer_on_rows=false").on_rows
    assert _engine(single_id_manifest, tmp_path / "i", "model.arch=omoe").on_rows
    engine = _engine(single_id_manifest, tmp_path / "j")
    engine.bf16 = True  # bf16 products (on CPUs that have them) are the lookup path's GEMMs
    assert not engine.on_rows
