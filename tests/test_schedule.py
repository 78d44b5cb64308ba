"""The dense learning-rate schedule, gradient clipping and the minimum number of epochs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from recsys_moe.config import TrainConfig, load_config
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training.optimizer import ClippedAdam
from recsys_moe.training.schedule import LrSchedule, StepControl
from recsys_moe.training.trainer import train


def test_warmup_then_cosine_to_the_floor() -> None:
    s = LrSchedule.from_config(TrainConfig(lr=1e-2, epochs=10, warmup_fraction=0.1, min_lr_ratio=0.1), 100)
    rates = [s.lr(i) for i in range(1000)]
    assert s.warmup_steps == 100
    assert rates[0] == pytest.approx(1e-4) and rates[99] == pytest.approx(1e-2)  # linear warmup
    assert all(a <= b for a, b in itertools.pairwise(rates[:100]))
    assert all(a >= b for a, b in itertools.pairwise(rates[99:]))  # then only down
    assert rates[-1] == pytest.approx(1e-3, rel=1e-3) and s.lr(5000) == pytest.approx(1e-3)  # the floor, and after
    constant = LrSchedule.from_config(TrainConfig(lr=1e-2, epochs=10, lr_schedule="constant", warmup_fraction=0), 100)
    assert {constant.lr(i) for i in range(1000)} == {1e-2}


def test_step_control_sets_the_rate_and_the_optimizer_clips() -> None:
    w = torch.nn.Parameter(torch.zeros(4))
    opt = ClippedAdam([w], lr=1.0, clip_norm=1.0)
    schedule = LrSchedule(base=0.5, total_steps=10, warmup_steps=0, min_ratio=1.0, kind="constant")
    control = StepControl(opt, schedule)
    w.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])  # norm 50
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.last_norm is not None and float(opt.last_norm) == pytest.approx(50.0)
    # Adam's first moment holds (1 - beta1) x the gradient it used: the unit-norm one.
    torch.testing.assert_close(opt.state[w]["exp_avg"], 0.1 * torch.tensor([0.6, 0.8, 0.0, 0.0]))
    torch.testing.assert_close(w.detach(), torch.tensor([-0.5, -0.5, 0.0, 0.0]))  # 0.5 x Adam's first step
    control.start(7)
    assert control.step == 7


@pytest.mark.parametrize(("min_epochs", "epochs_run"), [(1, 2), (3, 3)])
def test_no_early_stop_before_min_epochs(
    synthetic_manifest: Manifest, tmp_path: Path, min_epochs: int, epochs_run: int
) -> None:
    """patience 1 and nothing learned after epoch 1 (a zero learning rate): the run stops after
    epoch 2, unless min_epochs asks for more."""
    config = load_config(
        None,
        [
            "train.epochs=5",
            "train.patience=1",
            f"train.min_epochs={min_epochs}",
            "train.lr=1e-30",
            "train.embedding_lr=1e-30",
            "train.baselines=false",
            "model.num_experts=2",
            f"train.checkpoint_dir={tmp_path}",
        ],
    )
    result = train(synthetic_manifest, config, progress=False)
    assert len(result.history) == epochs_run
