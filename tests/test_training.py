from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_moe.config import ConfigError, ModelConfig, load_config
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.kernels import gemm
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training import checkpoint
from recsys_moe.training.evaluation import evaluate
from recsys_moe.training.metrics import auc
from recsys_moe.training.trainer import LocalEngine, train


def _config(tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            "train.epochs=3",
            "train.batch_size=256",
            "train.patience=10",
            f"train.checkpoint_dir={tmp_path / 'run'}",
            "model.num_experts=4",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained(synthetic_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory):
    return train(synthetic_manifest, _config(tmp_path_factory.mktemp("t")), progress=False)


def test_training_lowers_the_loss_and_learns(trained) -> None:
    h = trained.history
    for task in ("click", "conversion"):
        assert h[-1][f"train_{task}_loss"] < h[0][f"train_{task}_loss"]
    assert trained.test.metrics["click"]["auc"] > 0.6


def test_best_epoch_is_chosen_on_the_mean_of_all_tasks(trained) -> None:
    means = [r["val_mean_score"] for r in trained.history]
    assert trained.best_epoch == int(np.argmax(means)) + 1
    for r in trained.history:
        assert r["val_mean_score"] == pytest.approx((r["val_click_auc"] + r["val_conversion_auc"]) / 2)


def test_metrics_are_per_task_never_pooled(synthetic_manifest: Manifest, trained) -> None:
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(num_experts=4))
    weights, _ = checkpoint.load_weights(trained.model_dir)
    model.load_state_dict(weights)
    data = InMemoryDataset.from_split(synthetic_manifest, "test", model.sparse.keys, model.task_names)
    ev = evaluate(model, data, 1000)
    batch = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        scores = model.predict(batch.dense, batch.sparse)
    for i, task in enumerate(model.task_names):
        assert ev.metrics[task]["auc"] == pytest.approx(auc(scores[:, i], data.labels[:, i]))
    pooled = auc(scores.reshape(-1), data.labels.reshape(-1))
    assert all(abs(m["auc"] - pooled) > 1e-3 for m in ev.metrics.values())


def test_evaluate_restores_the_mode(synthetic_manifest: Manifest) -> None:
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(dropout=0.2))
    data = InMemoryDataset.from_split(synthetic_manifest, "valid", model.sparse.keys, model.task_names)
    model.train()
    evaluate(model, data, 512)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    evaluate(model, data, 512)
    assert not model.training


def test_regression_tasks_train(synthetic_raw: Path, tmp_path: Path) -> None:
    from recsys_moe.features import load_spec
    from recsys_moe.features.spec import parse_spec
    from recsys_moe.pipelines.build import build

    raw = load_spec("synthetic").model_dump(mode="json")
    raw["tasks"].append({"name": "dwell", "label": "log1p(dwell_seconds)", "type": "regression"})
    manifest = build(parse_spec(raw), synthetic_raw, tmp_path / "ds", progress=False)
    result = train(manifest, _config(tmp_path, "train.epochs=2"), progress=False)
    dwell = result.test.metrics["dwell"]
    assert set(dwell) == {"mse", "r2", "score"} and dwell["r2"] > 0.05


def test_embedding_penalty_is_the_mean_squared_norm_of_the_looked_up_rows() -> None:
    from recsys_moe.training.losses import embedding_penalty, training_loss

    pooled = torch.randn(5, 12)
    brute = sum(float((row**2).sum()) for row in pooled) / 5
    assert float(embedding_penalty(pooled)) == pytest.approx(brute, rel=1e-6)
    per_task, weights = torch.tensor([0.5, 0.25]), torch.tensor([1.0, 2.0])
    plain = training_loss(per_task, weights, None, None, 0.0)
    assert float(plain) == pytest.approx(1.0)
    assert float(training_loss(per_task, weights, None, None, 0.0, pooled, 0.1)) == pytest.approx(1.0 + 0.1 * brute)
    assert float(training_loss(per_task, weights, None, None, 0.0, pooled, 0.0)) == float(plain)


def test_embedding_l2_shrinks_the_rows_training_touches(synthetic_manifest: Manifest, tmp_path: Path) -> None:
    """The penalty reaches the tables through FBGEMM's fused optimizer: with it, the rows a
    training epoch looks up end smaller than the same run's rows without it."""
    norms = {}
    for l2 in (0.0, 0.5):
        engine = LocalEngine(synthetic_manifest, _config(tmp_path / str(l2), f"train.embedding_l2={l2}"), False)
        engine.train_epoch(0, checkpoint.Progress(run_id=None, loss_sum=[0.0, 0.0]), bar=False)
        weights = [t.weight.detach() for t in engine.ranker.sparse.ebc.embedding_bags.values()]
        # Its splits' ids were checked as they loaded: FBGEMM's per-batch check is off.
        assert not engine.ranker.sparse.checks_ids
        norms[l2] = float(torch.cat([w.norm(dim=1) for w in weights]).mean())
    assert norms[0.5] < 0.8 * norms[0.0], norms


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_continues_exactly(
    synthetic_manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """A run stopped after epoch 2 and resumed to epoch 3 ends where an uninterrupted run ends
    (the learning-rate schedule included: it is a function of the step), in bf16 products too."""
    if precision == "bf16" and not gemm.bf16_native():
        pytest.skip("needs a CPU with bf16 instructions (AVX512-BF16 or AMX)")
    setting = f"train.precision={precision}"
    full = train(synthetic_manifest, _config(tmp_path / "a", setting), progress=False)
    real_epoch = LocalEngine.train_epoch

    def stop_at_third(self, epoch, progress, bar):  # type: ignore[no-untyped-def]
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, progress, bar)

    monkeypatch.setattr(LocalEngine, "train_epoch", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        train(synthetic_manifest, _config(tmp_path / "b", setting), progress=False)
    monkeypatch.setattr(LocalEngine, "train_epoch", real_epoch)
    resumed = train(synthetic_manifest, _config(tmp_path / "b", setting), progress=False, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    w_full, _ = checkpoint.load_weights(tmp_path / "a" / "run" / "last")
    w_resumed, _ = checkpoint.load_weights(tmp_path / "b" / "run" / "last")
    for k in w_full:
        torch.testing.assert_close(w_resumed[k], w_full[k], rtol=1e-5, atol=1e-6)
    assert resumed.test.metrics["click"]["auc"] == pytest.approx(full.test.metrics["click"]["auc"], abs=1e-6)


@pytest.mark.skipif(not gemm.bf16_native(), reason="needs a CPU with bf16 instructions (AVX512-BF16 or AMX)")
def test_bf16_products_train_as_well_as_fp32(synthetic_manifest: Manifest, trained, tmp_path: Path) -> None:
    """The same run with `train.precision=bf16`: it really ran in bf16 (other losses), learns as
    well (test AUCs within 0.01 of fp32's), and saves fp32 weights that score in fp32."""
    config = _config(tmp_path, "train.precision=bf16")
    assert LocalEngine(synthetic_manifest, config, False).extra_params["dense_products"] == "bf16"
    result = train(synthetic_manifest, config, progress=False)
    assert result.history[0]["train_click_loss"] != trained.history[0]["train_click_loss"]
    for task in ("click", "conversion"):
        assert result.test.metrics[task]["auc"] == pytest.approx(trained.test.metrics[task]["auc"], abs=0.01)
    weights, _ = checkpoint.load_weights(result.model_dir)
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())


def test_bf16_falls_back_to_fp32_on_a_cpu_without_bf16(
    synthetic_manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Emulated bf16 is slower than fp32: such a host trains in fp32, says so, and logs what ran."""
    monkeypatch.setattr(gemm, "bf16_native", lambda: False)
    engine = LocalEngine(synthetic_manifest, _config(tmp_path, "train.precision=bf16"), False)
    assert not engine.bf16 and engine.extra_params["dense_products"] == "fp32"
    assert "train.precision=bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX)" in caplog.text
    assert LocalEngine(synthetic_manifest, _config(tmp_path), False).extra_params["dense_products"] == "fp32"


@pytest.mark.skipif(not gemm.bf16_native(), reason="needs a CPU with bf16 instructions (AVX512-BF16 or AMX)")
def test_bf16_on_a_model_without_bf16_products_says_so(
    synthetic_manifest: Manifest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shared-Bottom has no expert block: the first epoch warns that bf16 changed nothing, once."""
    config = _config(tmp_path, "train.precision=bf16", "model.arch=shared_bottom", "train.max_steps_per_epoch=3")
    engine = LocalEngine(synthetic_manifest, config, False)
    for epoch in range(2):
        engine.train_epoch(epoch, checkpoint.Progress(run_id=None, loss_sum=[0.0, 0.0]), bar=False)
    assert caplog.text.count("train.precision=bf16: no product of this model ran in bf16") == 1
    assert not engine.bf16
    mmoe = LocalEngine(synthetic_manifest, _config(tmp_path / "m", "train.precision=bf16"), False)
    mmoe.train_epoch(0, checkpoint.Progress(run_id=None, loss_sum=[0.0, 0.0]), bar=False)
    assert mmoe.bf16 and caplog.text.count("no product of this model ran in bf16") == 1


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=transformer"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="model.expert_hidden: layer sizes must be positive"):
        load_config(None, ["model.expert_hidden=[8, 0]"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])


def test_example_config_loads_and_matches_defaults() -> None:
    from pathlib import Path

    example = load_config(Path(__file__).resolve().parents[1] / "configs" / "mmoe.yaml")
    assert example == load_config(None)
