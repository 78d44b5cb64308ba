"""The promotion gate: a new version becomes `champion` only if it beats the current one.

Both models score the same raw holdout rows, each through its own bundle (their vocabularies may
differ), and are compared on every configured metric — all tasks by default, never one task
alone. The candidate is promoted when the mean improvement reaches `margin` and no metric gets
worse by more than `tolerance`; otherwise it gets the `challenger` alias. Either way the
comparison is written to the candidate's model-version tags, so the registry shows why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field

from recsys_moe.features.expressions import compile_expression
from recsys_moe.scoring import Scorer
from recsys_moe.training.metrics import task_metrics

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
PREVIOUS = "previous_champion"  # tag on a champion version: the version it replaced (for rollback)
HIGHER_IS_BETTER = {"auc": True, "r2": True, "logloss": False, "mse": False}


class PromotionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(
        default_factory=list,
        description="'<task>.<metric>' to compare (auc, logloss, r2, mse); empty: auc of every binary "
        "task and r2 of every regression task",
    )
    margin: float = Field(0.0, ge=0, description="required mean improvement over the champion")
    tolerance: float = Field(0.002, ge=0, description="largest allowed regression on any single metric")


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate: dict[str, float]
    champion: dict[str, float] = field(default_factory=dict)
    champion_version: str | None = None
    rows: int = 0

    def tags(self) -> dict[str, str]:
        tags = {
            "gate.decision": "promoted" if self.promote else "not promoted",
            "gate.reason": self.reason[:500],
            "gate.holdout_rows": str(self.rows),
        }
        tags.update({f"gate.candidate.{k}": f"{v:.6f}" for k, v in self.candidate.items()})
        tags.update({f"gate.champion.{k}": f"{v:.6f}" for k, v in self.champion.items()})
        if self.champion_version is not None:
            tags["gate.champion_version"] = self.champion_version
        return tags


def holdout_metrics(scorer: Scorer, holdout: pl.DataFrame) -> tuple[dict[str, float], int]:
    """Every task's metrics on the holdout rows this model accepts, as '<task>.<metric>'."""
    scored = scorer.score(holdout)
    labeled = holdout[scored.rows.tolist()] if scored.rows.size else holdout.head(0)
    out: dict[str, float] = {}
    for i, (task, kind) in enumerate(zip(scorer.tasks, scorer.task_types)):
        spec_task = next((t for t in scorer.spec.tasks if t.name == task), None)
        if spec_task is None or not compile_expression(spec_task.label).columns <= set(holdout.columns):
            continue  # the holdout has no label for this task
        labels = labeled.select(compile_expression(spec_task.label).expr.cast(pl.Float32)).to_series().to_numpy()
        metrics = task_metrics(
            kind, torch.from_numpy(scored.scores[:, i]), torch.from_numpy(np.array(labels, dtype=np.float32))
        )
        out.update({f"{task}.{k}": float(v) for k, v in metrics.items() if k != "score"})
    return out, len(scored.rows)


def default_metrics(scorer: Scorer) -> list[str]:
    return [f"{t}.{'auc' if k == 'binary' else 'r2'}" for t, k in zip(scorer.tasks, scorer.task_types)]


def decide(
    candidate: dict[str, float], champion: dict[str, float] | None, metrics: list[str], config: PromotionConfig
) -> tuple[bool, str]:
    missing = [m for m in metrics if m not in candidate]
    if missing:
        return False, f"candidate has no {missing} on the holdout"
    if champion is None:
        return True, "no champion yet"
    missing = [m for m in metrics if m not in champion]
    if missing:
        return False, f"champion has no {missing} on this holdout: not comparable (promote with --force)"
    deltas = {}
    for m in metrics:
        higher = HIGHER_IS_BETTER[m.rsplit(".", 1)[1]]
        deltas[m] = (candidate[m] - champion[m]) * (1 if higher else -1)
    worst = min(deltas, key=deltas.__getitem__)
    mean = float(np.mean(list(deltas.values())))
    summary = ", ".join(f"{m} {d:+.4f}" for m, d in deltas.items())
    if deltas[worst] < -config.tolerance:
        return False, f"{worst} is worse by {-deltas[worst]:.4f} > tolerance {config.tolerance} ({summary})"
    improved = mean >= config.margin if config.margin > 0 else mean > 0  # a tie keeps the champion
    if not improved:
        return False, f"mean improvement {mean:+.4f} does not reach the margin {config.margin} ({summary})"
    return True, f"mean improvement {mean:+.4f} ≥ margin {config.margin} ({summary})"


def evaluate_candidate(
    candidate: Scorer,
    champion: Scorer | None,
    holdout: pl.DataFrame,
    config: PromotionConfig,
    champion_version: str | None = None,
) -> Decision:
    metrics = config.metrics or default_metrics(candidate)
    unknown = [m for m in metrics if "." not in m or m.rsplit(".", 1)[1] not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(
            f"promotion.metrics: {unknown} are not '<task>.<metric>' with metric in {list(HIGHER_IS_BETTER)}"
        )
    cand, rows = holdout_metrics(candidate, holdout)
    champ = holdout_metrics(champion, holdout)[0] if champion is not None else None
    promote, reason = decide(cand, champ, metrics, config)
    return Decision(
        promote,
        reason,
        {m: cand[m] for m in metrics if m in cand},
        {m: champ[m] for m in metrics if champ and m in champ},
        champion_version,
        rows,
    )


def read_holdout(path: Path) -> pl.DataFrame:
    """A parquet file or directory of raw labeled rows."""
    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no holdout parquet files")
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
