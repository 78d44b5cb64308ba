"""The dense optimizer: fused Adam with the gradient-norm clip folded into its kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from recsys_moe.training.optimizer import ClippedAdam
from recsys_moe.training.schedule import LrSchedule, StepControl


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(263, 8, 64), (8, 1, 64), (2, 16, 1), ()]]


def _grads(step: int, params: list[torch.nn.Parameter], size: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) * size for p in params]


@pytest.mark.parametrize("clip_norm", [None, 1.0, 1e4])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_clipped_adam_steps_as_clip_grad_norm_then_adam(clip_norm: float | None, weight_decay: float) -> None:
    """Ten steps with gradients above and below the clip (a norm of about 0.5 to 500), against
    torch's `clip_grad_norm_` and fused Adam: the same weights and the same norms."""
    ours, theirs = _params(), _params()
    opt = ClippedAdam(ours, lr=0.01, weight_decay=weight_decay, clip_norm=clip_norm)
    ref = torch.optim.Adam(theirs, lr=0.01, weight_decay=weight_decay, fused=True)
    for step in range(10):
        size = [0.01, 1.0, 10.0][step % 3]
        for params in (ours, theirs):
            for p, g in zip(params, _grads(step, params, size)):
                p.grad = g
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, clip_norm) if clip_norm is not None else None
        ref.step()
        if norm is not None:
            assert opt.last_norm is not None and opt.last_norm.item() == pytest.approx(norm.item(), rel=1e-6)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        opt.zero_grad()
        assert all(p.grad is None for p in ours)


def test_clipped_adam_state_is_adams_both_ways() -> None:
    """A checkpoint of either optimizer loads into the other, and training goes on alike."""
    a, b = _params(), _params()
    ours = ClippedAdam(a, lr=0.01, clip_norm=1.0)
    for step in range(3):
        for p, g in zip(a, _grads(step, a, 1.0)):
            p.grad = g
        ours.step()
    theirs = torch.optim.Adam(b, lr=0.01, fused=True)
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # a CPU load would share the tensors
    back = ClippedAdam(_params(1), lr=0.01, clip_norm=1.0)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert float(back.state_dict()["state"][0]["step"]) == 3
    for p, q in zip(a, b):
        p.grad, q.grad = torch.full_like(p, 0.001), torch.full_like(q, 0.001)  # under the clip
    ours.step()
    theirs.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clipped_adam_takes_its_rate_from_the_schedule_hook() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = ClippedAdam([w], lr=1.0, clip_norm=None)
    StepControl(opt, LrSchedule(base=0.25, total_steps=10, warmup_steps=0, min_ratio=1.0, kind="constant"))
    w.grad = torch.tensor([3.0, -4.0])
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.25
    torch.testing.assert_close(w.detach(), torch.tensor([-0.25, 0.25]))  # Adam's first step: lr x sign


def test_clipped_adam_skips_parameters_without_gradients_and_refuses_a_bad_clip() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = ClippedAdam([a, b], lr=0.1, clip_norm=1.0)
    opt.step()  # no gradient anywhere: nothing happens
    a.grad = torch.ones(3)
    opt.step()
    assert not torch.equal(a, torch.ones(3)) and torch.equal(b, torch.ones(3)) and b not in opt.state
    with pytest.raises(ValueError, match="clip_norm"):
        ClippedAdam([a], lr=0.1, clip_norm=0.0)
