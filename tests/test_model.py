from __future__ import annotations

import polars as pl
import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from recsys_moe.config import ModelConfig
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.kernels.dense import combine, dense_experts_combine
from recsys_moe.model.embeddings import SparseArch, plan_tables
from recsys_moe.model.gates import Gates
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.model.stacked import StackedMLP
from recsys_moe.pipelines.manifest import Manifest, SparseFeatureInfo


def _data(manifest: Manifest, model: MultiTaskRanker, split: str = "train") -> InMemoryDataset:
    return InMemoryDataset.from_split(manifest, split, model.sparse.keys, model.task_names)


@pytest.mark.parametrize("arch", ["mmoe", "shared_bottom"])
@pytest.mark.parametrize("batch_size", [1, 1024])
def test_forward_shapes(synthetic_manifest: Manifest, arch: str, batch_size: int) -> None:
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(arch=arch))
    batch = _data(synthetic_manifest, model).batch(torch.arange(batch_size))
    out = model(batch.dense, batch.sparse)
    assert out.logits.shape == (batch_size, 2)  # a batch of one keeps its batch dimension
    if arch == "mmoe":
        assert out.gate_weights is not None and out.gate_weights.shape == (batch_size, 2, 8)
    scores = model.predict(batch.dense, batch.sparse)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_single_task_keeps_task_dimension(synthetic_manifest: Manifest) -> None:
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(arch="single_task"), tasks=["conversion"])
    batch = _data(synthetic_manifest, model).batch(torch.arange(1))
    assert model(batch.dense, batch.sparse).logits.shape == (1, 1)
    with pytest.raises(ValueError, match="single_task trains exactly one task"):
        MultiTaskRanker(synthetic_manifest, ModelConfig(arch="single_task"))


def test_gates_sum_to_one_and_have_no_batchnorm() -> None:
    gates = Gates(d_in=12, num_experts=5, num_gates=3)
    w = gates(torch.randn(7, 12)).weights
    assert w.shape == (7, 3, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(7, 3))
    assert (w > 0).all()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gates.modules())
    # Routing of one sample does not depend on the rest of the batch (it would with BatchNorm).
    x = torch.randn(4, 12)
    torch.testing.assert_close(gates(x).weights[:1], gates(x[:1]).weights)


def test_model_gates_have_no_batchnorm(synthetic_manifest: Manifest) -> None:
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(arch="mmoe"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("shared_input", [True, False])
def test_stacked_mlp_matches_a_loop_of_linears(shared_input: bool) -> None:
    torch.manual_seed(0)
    num, d_in, hidden, batch = 4, 6, [5, 3], 9
    stacked = StackedMLP(num, d_in, hidden).double()
    x = (
        torch.randn(batch, d_in, dtype=torch.float64)
        if shared_input
        else torch.randn(num, batch, d_in, dtype=torch.float64)
    )
    x.requires_grad_(True)
    loops = []
    for e in range(num):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip([d_in, *hidden], hidden)):
            lin = nn.Linear(a, b).double()
            with torch.no_grad():
                lin.weight.copy_(stacked.layer_weight(i)[e].T)
                lin.bias.copy_(stacked.biases[i][e, 0])
            layers += [lin, nn.ReLU()]
        loops.append(nn.Sequential(*layers))
    ref = torch.stack([loops[e](x if shared_input else x[e]) for e in range(num)])
    out = stacked(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g, retain_graph=True)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref)
    grads = torch.autograd.grad((stacked(x) * g).sum(), list(stacked.weights))
    grads = [grads[0].permute(1, 0, 2), *grads[1:]]  # layer 0 is stored [d_in, num, h]
    for e in range(num):
        ref_grads = torch.autograd.grad(
            (loops[e](x if shared_input else x[e]) * g[e]).sum(),
            [m.weight for m in loops[e] if isinstance(m, nn.Linear)],
        )
        for i, rg in enumerate(ref_grads):
            torch.testing.assert_close(grads[i][e], rg.T)


def test_combine_is_the_gate_weighted_sum() -> None:
    experts, gates = torch.randn(3, 5, 4), torch.softmax(torch.randn(5, 2, 3), -1)
    ref = torch.stack([sum(gates[:, g, e, None] * experts[e] for e in range(3)) for g in range(2)])
    torch.testing.assert_close(combine(experts, gates), ref)


def test_small_tables_are_packed(synthetic_manifest: Manifest) -> None:
    plan = plan_tables(synthetic_manifest.sparse_features, pack_below=100_000)
    assert len(plan.tables) < len(synthetic_manifest.sparse_features)
    assert sorted(plan.keys) == sorted(f.name for f in synthetic_manifest.sparse_features)
    unpacked = plan_tables(synthetic_manifest.sparse_features, pack_below=0)
    assert len(unpacked.tables) == len(synthetic_manifest.sparse_features) and not any(unpacked.offsets)


def test_packed_and_unpacked_models_agree(synthetic_manifest: Manifest) -> None:
    """Packing is a layout choice only: copy each feature's rows over and every feature's pooled
    embedding matches."""
    packed = MultiTaskRanker(synthetic_manifest, ModelConfig(pack_tables_below=100_000))
    plain = MultiTaskRanker(synthetic_manifest, ModelConfig(pack_tables_below=0))
    plan = plan_tables(synthetic_manifest.sparse_features, 100_000)
    rows = {f.name: f.num_embeddings for f in synthetic_manifest.sparse_features}
    with torch.no_grad():
        for table in plan.tables:
            src = packed.sparse.ebc.embedding_bags[table.name].weight
            for name in table.feature_names:
                start = plan.offsets[plan.keys.index(name)]
                plain.sparse.ebc.embedding_bags[f"t_{name}"].weight.copy_(src[start : start + rows[name]])
    batch_p = _data(synthetic_manifest, packed).batch(torch.arange(64))
    batch_u = _data(synthetic_manifest, plain).batch(torch.arange(64))
    got, want = packed.sparse.lookup(batch_p.sparse).to_dict(), plain.sparse.lookup(batch_u.sparse).to_dict()
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_fused_training_weights_load_into_a_plain_ebc(synthetic_manifest: Manifest) -> None:
    """Training uses FBGEMM's fused TBE; export and serving use a plain EmbeddingBagCollection."""
    fused = MultiTaskRanker(synthetic_manifest, ModelConfig(), fused_optimizer=("adagrad", {"lr": 0.1}))
    batch = _data(synthetic_manifest, fused).batch(torch.arange(256))
    fused(batch.dense, batch.sparse).logits.sum().backward()  # one fused embedding update
    plain = MultiTaskRanker(synthetic_manifest, ModelConfig())
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused(batch.dense, batch.sparse).logits, plain(batch.dense, batch.sparse).logits)


def test_layer_input_norm_is_per_row_trains_and_reloads(synthetic_manifest: Manifest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """model.input_norm=layer: each row is normalised on its own (a row scores the same alone as in
    a batch, in training mode too), the norm's weights train, and the saved bundle scores as the
    trainer did."""
    from recsys_moe.config import load_config
    from recsys_moe.registry.promotion import read_holdout
    from recsys_moe.scoring import Scorer
    from recsys_moe.training.trainer import train

    model = MultiTaskRanker(synthetic_manifest, ModelConfig(input_norm="layer"))
    assert isinstance(model.input_norm, nn.LayerNorm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    batch = _data(synthetic_manifest, model).batch(torch.arange(64))
    model.train()
    together = model(batch.dense, batch.sparse).logits
    alone = _data(synthetic_manifest, model).batch(torch.arange(1))
    torch.testing.assert_close(model(alone.dense, alone.sparse).logits, together[:1])
    default = MultiTaskRanker(synthetic_manifest, ModelConfig())
    assert not any(k.startswith("input_norm") for k in default.state_dict())  # old bundles still load

    config = load_config(
        None, ["model.input_norm=layer", "train.epochs=2", "train.baselines=false", f"train.checkpoint_dir={tmp_path}"]
    )
    result = train(synthetic_manifest, config, progress=False)
    assert result.test.metrics["click"]["auc"] > 0.6
    scorer = Scorer(result.model_dir)
    assert not torch.equal(scorer.model.input_norm.weight, torch.ones_like(scorer.model.input_norm.weight))
    rows = read_holdout(synthetic_manifest.raw_path("test")).head(40)
    scored = scorer.score(rows)
    torch.testing.assert_close(
        torch.from_numpy(scored.scores).float(), result.test.scores[:40].float(), rtol=0, atol=1e-5
    )


def _features(pooling: str = "sum") -> list[SparseFeatureInfo]:
    return [
        SparseFeatureInfo(name="a", kind="categorical", num_embeddings=7, embedding_dim=4),
        SparseFeatureInfo(name="b", kind="multi_hot", num_embeddings=5, embedding_dim=4, max_length=3),
        SparseFeatureInfo(name="big", kind="categorical", num_embeddings=50, embedding_dim=4, pooling=pooling),
    ]


def _fused_arch(pooling: str = "sum") -> SparseArch:
    torch.manual_seed(0)
    return SparseArch(_features(pooling), pack_below=20, fused_optimizer=("adagrad", {"lr": 0.5}))


def _kjt(keys: list[str]) -> KeyedJaggedTensor:
    rows = {"a": ([1, 6, 0], [1, 1, 1]), "b": ([4, 2, 1, 3], [2, 0, 2]), "big": ([49, 0, 17], [1, 1, 1])}
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor([v for k in keys for v in rows[k][0]]),
        lengths=torch.tensor([n for k in keys for n in rows[k][1]], dtype=torch.int32),
    )


def test_direct_kernel_lookup_is_the_ebc_forward_and_update() -> None:
    """The lookup that skips the fused EBC's per-feature split gives its output, and its backward
    the same fused update of every table row, bit for bit."""
    fast, module = _fused_arch(), _fused_arch()  # the same seed: the same tables
    assert fast._direct is not None  # one pooling: packed and unpacked tables share one kernel
    module._direct = None
    grad = torch.randn(3, 12)
    before = [w.clone() for w in fast.ebc.state_dict().values()]
    outs = []
    for arch in (fast, module):
        pooled = arch.lookup(_kjt(arch.keys))
        assert pooled.keys() == arch.output_keys
        (pooled.values() * grad).sum().backward()
        outs.append((pooled.values().detach(), [w.detach().clone() for w in arch.ebc.state_dict().values()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for got, want in zip(outs[0][1], outs[1][1]):
        assert torch.equal(got, want)
    assert any(not torch.equal(w, b) for w, b in zip(outs[0][1], before))  # the rows were updated


def test_table_ids_add_each_keys_offset_for_every_batch_shape() -> None:
    """The offsets `table_ids` keeps per batch shape: batches of two shapes in turn, int32 and
    int64 ids, each get its ids shifted by its own key's first row."""
    arch = _fused_arch()
    assert arch._needs_offsets
    short = KeyedJaggedTensor(
        keys=arch.keys, values=torch.tensor([3, 1, 2, 40]), lengths=torch.tensor([1, 2, 1], dtype=torch.int32)
    )
    for kjt in [_kjt(arch.keys), short, _kjt(arch.keys), short]:
        for dtype in (torch.int64, torch.int32):
            ids = KeyedJaggedTensor(keys=arch.keys, values=kjt.values().to(dtype), lengths=kjt.lengths())
            per_key = kjt.lengths().view(len(arch.keys), -1).sum(dim=1)
            want = ids.values() + torch.repeat_interleave(arch.id_offsets, per_key).to(dtype)
            got = arch.table_ids(ids)
            assert got.values().dtype == dtype and torch.equal(got.values(), want)
            assert torch.equal(got.lengths(), kjt.lengths()) and got.length_per_key() == per_key.tolist()


@pytest.mark.parametrize("size", [1, 300, 1024])
def test_training_batches_look_up_what_a_plain_kjt_does(synthetic_manifest: Manifest, size: int) -> None:
    """A shuffled training batch (int32 ids, lengths and offsets made once per batch size and
    handed to the KJT) pools the embeddings a KJT built from the same rows' int64 ids does."""
    torch.manual_seed(0)
    single = [f for f in synthetic_manifest.sparse_features if f.kind != "multi_hot"]
    arch = SparseArch(single, fused_optimizer=("adagrad", {"lr": 0.1}))
    data = InMemoryDataset.from_split(synthetic_manifest, "train", arch.keys, synthetic_manifest.task_names)
    assert data.ids.dtype == torch.int32 and not data.multi_hot
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(size))[:size]
    for _ in range(2):  # the second batch of this size reuses the first one's lengths
        kjt = data.batch(pick).sparse
        ids = data.ids.long()[pick].t().reshape(-1)
        plain = KeyedJaggedTensor(keys=arch.keys, values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int32))
        assert kjt.length_per_key() == plain.length_per_key() and torch.equal(kjt.offsets(), plain.offsets())
        assert torch.equal(kjt.values(), ids.int())
        assert torch.equal(arch.lookup(kjt).values(), arch.lookup(plain).values())


def test_direct_kernel_falls_back_where_it_does_not_apply() -> None:
    assert _fused_arch(pooling="mean")._direct is None  # two poolings: two kernels
    arch = _fused_arch()
    reordered = _kjt(list(reversed(arch.keys)))  # keys not in the kernel's order: the module's forward
    ref = _fused_arch()
    ref._direct = None
    torch.testing.assert_close(arch.lookup(reordered).to_dict(), ref.lookup(reordered).to_dict())
    arch.ebc = EmbeddingBagCollection(tables=plan_tables(_features(), 20).tables)  # replaced (as sharding does)
    assert arch.lookup(_kjt(arch.keys)).values().shape == (3, 12)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_a_plain_ebc_looks_up_table_by_table_what_its_forward_does(pooling: str) -> None:
    """Scoring's lookup (one EmbeddingBag call per table, `SparseArch._table_bags`) gives the
    EBC's per-feature forward bit for bit: a packed and a lone table, two poolings, an empty
    list, int32 and int64 ids, a batch of one."""
    torch.manual_seed(0)
    arch = SparseArch(_features(pooling), pack_below=20)
    assert arch._by_table is not None
    assert [(bag.mode, count) for bag, count in arch._by_table[1]] == [(pooling, 1), ("sum", 2)]
    one = KeyedJaggedTensor(
        keys=arch.keys, values=torch.tensor([33, 5]), lengths=torch.tensor([1, 1, 0], dtype=torch.int32)
    )  # keys: big, a, b (an empty list)
    assert arch.keys == ["big", "a", "b"]
    for kjt in (_kjt(arch.keys), one):
        for dtype in (torch.int64, torch.int32):
            ids = KeyedJaggedTensor(keys=arch.keys, values=kjt.values().to(dtype), lengths=kjt.lengths())
            want = arch.ebc(arch.table_ids(ids))
            got = arch.lookup(ids)
            assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
            assert torch.equal(got.values(), want.values())


def test_a_plain_ebc_scores_the_same_by_table(synthetic_manifest: Manifest) -> None:
    """The whole model on the synthetic spec's rows (multi-hot lists among them): the same
    scores through the table-by-table lookup as through the EBC's forward."""
    torch.manual_seed(0)
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(arch="mmoe"))
    model.eval()
    assert model.sparse._by_table is not None
    batch = _data(synthetic_manifest, model).batch(torch.randperm(300))
    fast = model.predict(batch.dense, batch.sparse)
    model.sparse._by_table = None
    assert torch.equal(fast, model.predict(batch.dense, batch.sparse))


def test_scores_with_onednn_are_the_torch_scores(synthetic_manifest: Manifest, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The faster expert block (hand-written backward, oneDNN GEMMs) scores the rows as the autograd
    block on torch's GEMMs does, within 1e-6; and one training step moves the weights alike."""
    from recsys_moe.kernels import gemm
    from recsys_moe.model import mmoe

    torch.manual_seed(0)
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(arch="mmoe"))
    batch = _data(synthetic_manifest, model).batch(torch.arange(300))
    model.eval()
    fast = model.predict(batch.dense, batch.sparse)
    monkeypatch.setattr(gemm, "ONEDNN", False)
    monkeypatch.setattr(mmoe, "experts_combine", dense_experts_combine)
    plain = model.predict(batch.dense, batch.sparse)
    assert (fast - plain).abs().max() <= 1e-6
    model.train()
    grads = []
    for _ in range(2):
        model.zero_grad()
        model(batch.dense, batch.sparse).logits.sum().backward()
        grads.append([p.grad.clone() for p in model.arch.parameters()])
        monkeypatch.undo()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sequential", [False, True])
def test_ids_outside_their_table_are_refused_at_load(synthetic_manifest: Manifest, sequential: bool) -> None:
    """A shard written with another vocabulary: an error naming the feature as the split loads,
    not FBGEMM's per-batch warning that then looks the id up as row 0."""
    keys = [f.name for f in synthetic_manifest.sparse_features]
    info = {f.name: f for f in synthetic_manifest.sparse_features}
    frame = pl.concat([pl.read_parquet(p) for p in synthetic_manifest.shard_paths("valid")])
    InMemoryDataset(frame, synthetic_manifest, keys, tasks=None, sequential=sequential)  # as written: loads
    single = next(k for k in keys if info[k].kind == "categorical")
    multi = next(k for k in keys if info[k].kind == "multi_hot")
    for key, bad in [(single, info[single].num_embeddings), (single, -3), (multi, info[multi].num_embeddings)]:
        values = frame[key].to_list()
        values[7] = [1, bad] if key == multi else bad
        broken = frame.with_columns(pl.Series(key, values, dtype=frame[key].dtype))
        with pytest.raises(ValueError, match=rf"sparse feature '{key}': id {bad} is outside its table"):
            InMemoryDataset(broken, synthetic_manifest, keys, tasks=None, sequential=sequential)


def test_only_trusted_tables_skip_the_per_batch_id_check(synthetic_manifest: Manifest) -> None:
    """`trust_ids` turns FBGEMM's per-batch check off for training's fused tables; a model built
    any other way keeps it."""
    fused = MultiTaskRanker(synthetic_manifest, ModelConfig(arch="mmoe"), fused_optimizer=("adagrad", {"lr": 0.1}))
    modes = lambda m: {e._emb_module.bounds_check_mode_int for e in m.sparse.ebc._emb_modules}  # noqa: E731
    assert modes(fused) != {BoundsCheckMode.NONE.value} and fused.sparse.checks_ids
    fused.sparse.trust_ids()
    assert modes(fused) == {BoundsCheckMode.NONE.value} and not fused.sparse.checks_ids


@pytest.mark.parametrize("multi_hot", [True, False])
def test_sequential_dataset_gives_the_same_batches(synthetic_manifest: Manifest, multi_hot: bool) -> None:
    """Scoring keeps ids feature-major (`sequential=True`): the same dense rows, KJT values and
    lengths as the row-major layout, for in-order slices and for gathers alike."""
    keys = [f.name for f in synthetic_manifest.sparse_features if multi_hot or f.kind == "categorical"]
    frame = pl.concat([pl.read_parquet(p) for p in synthetic_manifest.shard_paths("valid")])
    rows = InMemoryDataset(frame, synthetic_manifest, keys, tasks=None)
    features = InMemoryDataset(frame, synthetic_manifest, keys, tasks=None, sequential=True)
    assert features.sequential and len(features) == len(rows)
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:300]
    for a, b in [*zip(rows.batches(777), features.batches(777)), (rows.batch(pick), features.batch(pick))]:
        assert torch.equal(a.dense, b.dense)
        assert a.sparse.keys() == b.sparse.keys() == keys
        assert torch.equal(a.sparse.values(), b.sparse.values())
        assert torch.equal(a.sparse.lengths(), b.sparse.lengths())
