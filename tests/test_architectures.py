from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from recsys_moe.config import ModelConfig
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.model.gates import Gates, balance_loss
from recsys_moe.model.ple import PLE
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training.losses import UncertaintyWeighting

GATED = ["omoe", "mmoe", "cgc", "ple"]


@pytest.mark.parametrize("arch", ["shared_bottom", *GATED])
@pytest.mark.parametrize("gate", ["softmax", "topk", "noisy_topk"])
@pytest.mark.parametrize("batch_size", [1, 512])
def test_every_architecture_and_gate(synthetic_manifest: Manifest, arch: str, gate: str, batch_size: int) -> None:
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(arch=arch, gate=gate, top_k=2))
    data = InMemoryDataset.from_split(synthetic_manifest, "train", model.sparse.keys, model.task_names)
    batch = data.batch(torch.arange(batch_size))
    out = model(batch.dense, batch.sparse)
    assert out.logits.shape == (batch_size, 2)
    if arch == "shared_bottom":
        assert out.gate_weights is None
        return
    w = out.gate_weights
    assert w is not None and w.shape[:2] == (batch_size, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(batch_size, 2))
    if gate != "softmax":
        assert ((w > 0).sum(-1) == 2).all()  # exactly top_k experts per sample and task
    out.logits.sum().backward()  # every architecture is trainable end to end


def test_ple_builds_the_configured_experts_in_every_layer() -> None:
    ple = PLE(d_in=10, num_tasks=3, n_task=2, n_shared=4, expert_hidden=[8, 6], levels=3)
    assert len(ple.layers) == 3
    for i, layer in enumerate(ple.layers):
        assert layer.shared_experts.num == 4  # the configured shared experts, in every layer
        assert layer.task_experts.num == 3 * 2
        assert layer.task_gates.num_experts == 2 + 4 and layer.task_gates.num_gates == 3
        # Shared gates feed the next layer's shared experts; the last layer has none.
        assert (layer.shared_gate is None) == (i == 2)
        if layer.shared_gate is not None:
            assert layer.shared_gate.num_experts == 3 * 2 + 4
    out = ple(torch.randn(5, 10))
    assert out.logits.shape == (5, 3) and out.gate_weights.shape == (5, 3, 3 * 2 + 4)
    # Task 0 never weights task 1's own experts (columns 2-3).
    assert (out.gate_weights[:, 0, 2:4] == 0).all() and (out.gate_weights[:, 0, :2] > 0).all()


@pytest.mark.parametrize("shared_gate", [False, True])  # CGC's one layer, PLE's first
@pytest.mark.parametrize("gate", ["softmax", "topk"])
def test_a_layer_on_one_input_runs_as_one_block_with_the_same_outputs_and_grads(shared_gate: bool, gate: str) -> None:
    """Experts that all read the model input run as MMoE's block (`experts_combine`) with each
    task's gate row zero outside its experts; a copy of the input as the shared input takes the
    stacked-MLP path. Same outputs (1e-6) and the same gradients for the input and every weight."""
    from recsys_moe.model.ple import ExtractionLayer

    torch.manual_seed(0)
    layer = ExtractionLayer(12, num_tasks=3, n_task=2, n_shared=3, hidden=[16, 8], shared_gate=shared_gate, gate=gate)
    x = torch.randn(37, 12, requires_grad=True)
    runs = []
    for shared_in in (x, x.clone()):  # `x` itself: one block; a copy: the general path
        layer.zero_grad()
        x.grad = None
        task_out, shared_out, gates = layer(x, shared_in)
        outs = [task_out, *([shared_out] if shared_out is not None else []), *(g.weights for g in gates)]
        assert task_out.shape == (3, 37, 8) and (shared_out is not None) == shared_gate
        torch.manual_seed(1)
        sum((o * torch.randn(o.shape)).sum() for o in outs).backward()  # not randn_like: strides differ
        grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        runs.append(([o.detach() for o in outs], grads))
    (fast, fast_grads), (slow, slow_grads) = runs
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cgc_is_one_extraction_layer(synthetic_manifest: Manifest) -> None:
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(arch="cgc", num_shared_experts=3))
    assert len(model.arch.layers) == 1 and model.arch.layers[0].shared_experts.num == 3


def test_topk_renormalises_over_the_chosen_experts() -> None:
    torch.manual_seed(0)
    gates = Gates(d_in=6, num_experts=5, num_gates=2, kind="topk", top_k=2, temperature=0.5)
    x = torch.randn(9, 6)
    out = gates(x)
    logits = (x @ gates.weight.permute(1, 0, 2).reshape(6, 10)).view(9, 2, 5) / 0.5
    top, idx = logits.topk(2, dim=-1)
    torch.testing.assert_close(out.weights.gather(-1, idx), torch.softmax(top, -1))
    torch.testing.assert_close(out.probs, torch.softmax(logits, -1))
    switch = Gates(d_in=6, num_experts=5, num_gates=1, kind="topk", top_k=1)(x).weights
    assert ((switch == 1) | (switch == 0)).all() and (switch.sum(-1) == 1).all()
    with pytest.raises(ValueError, match="top_k must be in 1..5"):
        Gates(d_in=6, num_experts=5, num_gates=1, kind="topk", top_k=6)


def test_noisy_topk_adds_noise_only_while_training() -> None:
    torch.manual_seed(0)
    gates = Gates(d_in=6, num_experts=8, num_gates=1, kind="noisy_topk", top_k=2)
    with torch.no_grad():
        gates.noise_weight.fill_(1.0)  # a large learned noise scale
    x = torch.randn(64, 6)
    gates.eval()
    torch.testing.assert_close(gates(x).weights, gates(x).weights)
    gates.train()
    assert not torch.equal(gates(x).weights, gates(x).weights)
    # The noise scale is learned: it receives a gradient.
    gates(x).weights.pow(2).sum().backward()
    assert gates.noise_weight.grad is not None and gates.noise_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["softmax", "topk"])
def test_balance_loss_spreads_a_collapsed_router(kind: str) -> None:
    torch.manual_seed(0)
    gates = Gates(d_in=8, num_experts=6, num_gates=2, kind=kind, top_k=2)
    with torch.no_grad():
        gates.bias.zero_()
        gates.bias[:, :, 0] = 6.0  # every sample sent to expert 0
    x = torch.randn(512, 8)

    def usage() -> torch.Tensor:
        with torch.no_grad():
            return gates(x).probs.mean(dim=0)  # [G, E]

    before = usage()
    assert before[:, 0].min() > 0.9
    opt = torch.optim.Adam(gates.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        balance_loss(gates(x)).backward()
        opt.step()
    after = usage()
    assert after[:, 0].max() < 0.4  # expert 0 no longer takes (nearly) everything
    assert after.min() > 0.05  # every expert now gets a share
    assert balance_loss(gates(x)) < 0.1 * balance_loss_of(before)


def balance_loss_of(mean_probs: torch.Tensor) -> torch.Tensor:
    return (mean_probs.var(-1, unbiased=False) / mean_probs.mean(-1).square()).mean() * 2


def test_uncertainty_weighting_downweights_the_noisier_task() -> None:
    weighting = UncertaintyWeighting(2)
    opt = torch.optim.Adam(weighting.parameters(), lr=0.05)
    losses = torch.tensor([0.5, 2.0])  # task 1 stays 4x harder
    for _ in range(600):
        opt.zero_grad()
        weighting(losses).backward()
        opt.step()
    # The optimum of exp(-s) L + s is s = log L: weights 1/L.
    torch.testing.assert_close(weighting.weights(), 1 / losses, rtol=0.02, atol=0.0)


@pytest.mark.slow
def test_every_architecture_trains_from_the_cli_and_logs_gates(synthetic_raw: Path, tmp_path: Path) -> None:
    """`recsys-moe train` with a config switch, on a spec with a binary and a regression task."""
    from recsys_moe.cli import main
    from recsys_moe.features import load_spec
    from recsys_moe.features.spec import parse_spec
    from recsys_moe.pipelines.build import build

    raw = load_spec("synthetic").model_dump(mode="json")
    raw["tasks"] = [raw["tasks"][0], {"name": "dwell", "label": "log1p(dwell_seconds)", "type": "regression"}]
    build(parse_spec(raw), synthetic_raw, tmp_path / "ds", progress=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    for arch in ["single_task", "shared_bottom", *GATED]:
        args = [
            "train",
            "--data",
            str(tmp_path / "ds"),
            "--arch",
            arch,
            "--epochs",
            "2",
            "--experiment",
            "archs",
            "--checkpoint-dir",
            str(tmp_path / arch),
            "--set",
            "train.batch_size=512",
        ]
        if arch == "single_task":
            args += ["--tasks", "dwell"]
        if arch == "ple":
            args += ["--set", "model.gate=noisy_topk", "--set", "train.balance_loss_weight=0.01"]
        if arch == "cgc":
            args += ["--set", "train.task_weighting=uncertainty"]
        import os

        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            assert main(args) == 0
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
        run = client.search_runs(
            [client.get_experiment_by_name("archs").experiment_id], f"params.`model.arch` = '{arch}'"
        )[0]
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        for task in ["dwell"] if arch == "single_task" else ["click", "dwell"]:
            assert f"test_{task}_auc" in metrics or f"test_{task}_mse" in metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        if arch in GATED:
            assert len(client.get_metric_history(run.info.run_id, "gate_click_entropy")) == 2
            assert "gate_dwell_e0_weight" in metrics
            assert "plots/gate_heatmap.png" in artifacts
        if arch == "ple":
            assert "gate_click_e0_routed" in metrics and "plots/gate_routing_heatmap.png" in artifacts
        if arch == "cgc":
            assert "task_weight_click" in metrics


@pytest.mark.parametrize("arch", ["mmoe", "omoe"])
def test_routed_experts_match_dense_experts(synthetic_manifest: Manifest, arch: str) -> None:
    """Top-k MMoE computing experts only on routed rows gives the dense path's outputs and grads."""
    torch.manual_seed(0)
    config = {"arch": arch, "gate": "topk", "top_k": 2, "num_experts": 6}
    routed = MultiTaskRanker(synthetic_manifest, ModelConfig(**config, expert_compute="routed"))
    dense = MultiTaskRanker(synthetic_manifest, ModelConfig(**config, expert_compute="dense"))
    assert routed.arch.routed and not dense.arch.routed
    assert (
        ModelConfig(**config).expert_compute == "auto"
        and MultiTaskRanker(synthetic_manifest, ModelConfig(**config)).arch.routed
    )
    dense.load_state_dict(routed.state_dict())
    data = InMemoryDataset.from_split(synthetic_manifest, "train", routed.sparse.keys, routed.task_names)
    batch = data.batch(torch.arange(300))
    out_r, out_d = routed(batch.dense, batch.sparse).logits, dense(batch.dense, batch.sparse).logits
    torch.testing.assert_close(out_r, out_d, rtol=1e-5, atol=1e-6)
    out_r.square().sum().backward()
    out_d.square().sum().backward()
    for (name, p_r), (_, p_d) in zip(routed.arch.named_parameters(), dense.arch.named_parameters()):
        torch.testing.assert_close(p_r.grad, p_d.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["mmoe", "omoe"])
def test_softmax_gates_in_the_block_are_the_gates_module(synthetic_manifest: Manifest, arch: str, monkeypatch) -> None:
    """MMoE computes softmax gates inside the expert block's first GEMM; with a balance loss on
    the gate probabilities and a temperature, the logits, gate weights and every gradient are
    those of `Gates` followed by the block."""
    torch.manual_seed(0)
    model = MultiTaskRanker(synthetic_manifest, ModelConfig(arch=arch, gate_temperature=0.8))
    data = InMemoryDataset.from_split(synthetic_manifest, "train", model.sparse.keys, model.task_names)
    batch = data.batch(torch.arange(300))
    runs = []
    for in_block in (True, False):
        monkeypatch.setattr(type(model.arch), "_gates_in_block", lambda self, x, on=in_block: on)
        model.zero_grad()
        out = model(batch.dense, batch.sparse)
        assert out.gate_weights.shape == (300, 2, model.arch.gates.num_experts)
        (out.logits.square().sum() + balance_loss(out.gates[0])).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out.logits.detach(), out.gate_weights.detach(), grads))
    (logits, weights, grads), (want_logits, want_weights, want_grads) = runs
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and any(n.startswith("arch.gates.") for n in grads)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
