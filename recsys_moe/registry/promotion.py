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
from recsys_moe.pipelines.validate import REASON, label_checks
from recsys_moe.scoring import Scorer
from recsys_moe.scoring.scorer import ROW
from recsys_moe.training.metrics import task_metrics

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
PREVIOUS = "previous_champion"  # tag on a champion version: the version it replaced (for rollback)
HIGHER_IS_BETTER = {"auc": True, "gauc": True, "r2": True, "logloss": False, "mse": False}


class PromotionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(
        default_factory=list,
        description="'<task>.<metric>' to compare (auc, gauc where the spec has a group_key, logloss, r2, mse); empty: auc of every binary "
        "task and r2 of every regression task",
    )
    margin: float = Field(0.0, ge=0, description="required mean improvement over the champion")
    tolerance: float = Field(0.002, ge=0, description="largest allowed regression on any single metric")
    min_rows: int = Field(100, ge=1, description="fewest holdout rows both models score; fewer: no promotion")
    max_extra_rejects: float = Field(
        0.01, ge=0, le=1, description="largest share of holdout rows the candidate may reject that the champion scores"
    )
    beat_baselines_by: float | None = Field(
        None,
        description="also require the candidate's run to beat each baseline fitted in it (training.baselines) "
        "by this much on every compared metric, on the run's test split; null: not required",
    )


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate: dict[str, float]
    champion: dict[str, float] = field(default_factory=dict)
    champion_version: str | None = None
    rows: int = 0  # the holdout rows both models were compared on
    forced: bool = False

    def tags(self) -> dict[str, str]:
        tags = {
            "gate.decision": "promoted" if self.promote else "not promoted",
            "gate.reason": self.reason[:500],
            "gate.holdout_rows": str(self.rows),
            "gate.forced": str(self.forced).lower(),
        }
        tags.update({f"gate.candidate.{k}": f"{v:.6f}" for k, v in self.candidate.items()})
        tags.update({f"gate.champion.{k}": f"{v:.6f}" for k, v in self.champion.items()})
        if self.champion_version is not None:
            tags["gate.champion_version"] = self.champion_version
        return tags


def _labels(scorer: Scorer, holdout: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
    """Each task's label as float32 ([N, T], NaN where the holdout has none), and which rows have
    a valid label for every task the holdout labels (the pipeline's own label checks)."""
    columns, checks = [], []
    for task in scorer.tasks:
        spec_task = next((t for t in scorer.spec.tasks if t.name == task), None)
        if spec_task is None or not spec_task.label_columns <= set(holdout.columns):
            columns.append(pl.lit(None, pl.Float32).alias(task))  # the holdout has no label for this task
            continue
        columns.append(compile_expression(spec_task.label).expr.cast(pl.Float32, strict=False).alias(task))
        checks += [cond.fill_null(False) for cond, _ in label_checks(spec_task)]
    bad = pl.any_horizontal(checks) if checks else pl.lit(False)
    frame = holdout.select(*columns, bad.alias("_bad_label"))
    return frame.drop("_bad_label"), ~frame["_bad_label"].to_numpy()


def _groups(scorer: Scorer, holdout: pl.DataFrame) -> np.ndarray | None:
    """GAUC's group of each holdout row (the spec's group_key, hashed as the trainer does), or None."""
    key = scorer.spec.group_key
    if key is None or key not in holdout.columns:
        return None
    return holdout[key].hash(seed=0).reinterpret(signed=True).to_numpy().copy()


def _metrics(
    scorer: Scorer, scores: np.ndarray, labels: pl.DataFrame, groups: np.ndarray | None = None
) -> dict[str, float]:
    """'<task>.<metric>' for every task the holdout labels, on these rows (with gauc where grouped)."""
    out: dict[str, float] = {}
    group_ids = torch.from_numpy(groups) if groups is not None else None
    for i, (task, kind) in enumerate(zip(scorer.tasks, scorer.task_types)):
        y = labels[task].to_numpy().astype(np.float32)
        if np.isnan(y).all():
            continue
        score = torch.from_numpy(np.ascontiguousarray(scores[:, i]))
        metrics = task_metrics(kind, score, torch.from_numpy(y), group_ids)
        out.update({f"{task}.{k}": float(v) for k, v in metrics.items() if k != "score"})
    return out


def input_contract(scorer: Scorer) -> dict[str, str]:
    """What a request to this model must carry: raw column → the kind of value it holds."""
    out = {}
    for f in scorer.spec.features:
        out[f.source_column] = f.kind if f.separator is None else f"{f.kind} separated by {f.separator!r}"
    return out


def compatible(candidate: Scorer, champion: Scorer) -> str | None:
    """Why the candidate cannot take the champion's place for its clients, or None."""
    mine_tasks = dict(zip(candidate.tasks, candidate.task_types))
    their_tasks = dict(zip(champion.tasks, champion.task_types))
    if mine_tasks != their_tasks:
        return (
            f"the candidate predicts {mine_tasks}, the champion {their_tasks}: its clients would lose, gain or "
            "misread tasks"
        )
    mine, theirs = input_contract(candidate), input_contract(champion)
    if mine != theirs:
        changed = sorted({c for c in mine.keys() | theirs.keys() if mine.get(c) != theirs.get(c)})
        return f"the candidate reads its input differently from the champion (columns {changed[:10]})"
    return None


def _evidence(scorer: Scorer, labels: pl.DataFrame, rows: int, config: PromotionConfig) -> str | None:
    """Why these rows cannot decide anything, or None."""
    if rows < config.min_rows:
        return f"only {rows} holdout rows to compare on (min_rows {config.min_rows})"
    for task, kind in zip(scorer.tasks, scorer.task_types):
        y = labels[task].drop_nulls().drop_nans()
        if kind == "binary" and y.len() > 0 and y.n_unique() < 2:
            return f"task {task} has a single class among the {rows} holdout rows: its AUC says nothing"
    return None


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


def baseline_shortfall(run_metrics: dict[str, float], metrics: list[str], margin: float) -> str | None:
    """Why the run does not beat its own baselines by `margin` on `metrics` ('<task>.<metric>',
    compared as the run logged them on its test split), or None when it does."""
    short = []
    for m in metrics:
        task, metric = m.rsplit(".", 1)
        model = run_metrics.get(f"test_{task}_{metric}")
        suffix = f"_test_{task}_{metric}"
        baselines = {
            k[len("baseline_") : -len(suffix)]: v
            for k, v in run_metrics.items()
            if k.startswith("baseline_") and k.endswith(suffix)
        }
        if model is None or not baselines:
            return f"the run logged no test {m} for the model and its baselines (train.baselines=false?)"
        for name, value in baselines.items():
            gain = (model - value) * (1 if HIGHER_IS_BETTER[metric] else -1)
            if not gain >= margin:
                short.append(f"{m} {model:.4f} vs {name} {value:.4f} ({gain:+.4f})")
    if short:
        return f"does not beat its baselines by {margin}: {'; '.join(short)}"
    return None


def require_baselines(
    decision: Decision, run_metrics: dict[str, float], metrics: list[str], config: PromotionConfig
) -> Decision:
    """`decision`, turned into a refusal when `config.beat_baselines_by` is set and the candidate's
    run (its logged `run_metrics`) does not beat its own baselines by it. The registry gate and
    the retraining DAG's gate both end with this."""
    if decision.promote and config.beat_baselines_by is not None:
        short = baseline_shortfall(run_metrics, metrics, config.beat_baselines_by)
        if short is not None:
            decision.promote, decision.reason = False, short
    return decision


def evaluate_candidate(
    candidate: Scorer,
    champion: Scorer | None,
    holdout: pl.DataFrame,
    config: PromotionConfig,
    champion_version: str | None = None,
) -> Decision:
    """Score both models on the holdout and decide, like with like: the same tasks and input
    contract as the champion, metrics on the rows both accept (and whose labels are valid), enough
    of them, both classes of every binary task, finite metrics."""
    metrics = config.metrics or default_metrics(candidate)
    unknown = [m for m in metrics if "." not in m or m.rsplit(".", 1)[1] not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(
            f"promotion.metrics: {unknown} are not '<task>.<metric>' with metric in {list(HIGHER_IS_BETTER)}"
        )

    def refuse(reason: str, rows: int = 0) -> Decision:
        return Decision(False, reason, {}, {}, champion_version, rows)

    if champion is not None and (why := compatible(candidate, champion)) is not None:
        return refuse(f"not comparable: {why} (promote with --force to replace it anyway)")
    labels, labeled = _labels(candidate, holdout)
    scored = candidate.score(holdout)
    keep = np.zeros(holdout.height, dtype=bool)
    keep[scored.rows] = True
    cand_at = np.full(holdout.height, -1)
    cand_at[scored.rows] = np.arange(len(scored.rows))
    if champion is not None:
        theirs = champion.score(holdout)
        champion_keeps = np.zeros(holdout.height, dtype=bool)
        champion_keeps[theirs.rows] = True
        extra = int((champion_keeps & ~keep).sum())  # rows the champion scores and the candidate refuses
        if extra > config.max_extra_rejects * max(int(champion_keeps.sum()), 1):
            first = scored.rejects.filter(pl.col(ROW).is_in(np.flatnonzero(champion_keeps & ~keep)[:1].tolist()))
            example = first[REASON][0] if first.height else "?"
            return refuse(f"the candidate rejects {extra} holdout rows the champion scores (first: {example})")
        keep &= champion_keeps
        champ_at = np.full(holdout.height, -1)
        champ_at[theirs.rows] = np.arange(len(theirs.rows))
    keep &= labeled
    common = np.flatnonzero(keep)
    labels = labels[common.tolist()] if len(common) else labels.head(0)
    if (why := _evidence(candidate, labels, len(common), config)) is not None:
        return refuse(why, len(common))
    groups = _groups(candidate, holdout)
    groups = groups[common] if groups is not None else None
    cand = _metrics(candidate, scored.scores[cand_at[common]], labels, groups)
    champ = None
    if champion is not None:
        champ_scores = theirs.scores[champ_at[common]]
        # In the candidate's task order: `compatible` made sure the tasks and their types agree.
        champ = _metrics(candidate, champ_scores[:, [champion.tasks.index(t) for t in candidate.tasks]], labels, groups)
    not_finite = sorted(
        m for m in metrics if not np.isfinite(cand.get(m, 0.0)) or not np.isfinite((champ or {}).get(m, 0.0))
    )
    if not_finite:
        return refuse(f"metrics {not_finite} are not finite on the {len(common)} holdout rows", len(common))
    promote, reason = decide(cand, champ, metrics, config)
    return Decision(
        promote,
        reason,
        {m: cand[m] for m in metrics if m in cand},
        {m: champ[m] for m in metrics if champ and m in champ},
        champion_version,
        len(common),
    )


def read_holdout(path: Path) -> pl.DataFrame:
    """A parquet file or directory of raw labeled rows."""
    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no holdout parquet files")
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
