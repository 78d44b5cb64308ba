"""Scheduled retraining of the multi-task ranker (Airflow 3, TaskFlow).

build_features → train → evaluate (vs the champion) → register → promote_or_keep
→ promote | keep → score_next_period (with the champion) → publish_summary

Each run works on the last complete day before its data interval ends, and writes under
``<home>/retrain/retrain_ranking/<day>/``. The logic of every step is in
``recsys_moe/retrain/steps.py`` and the run's params in ``recsys_moe/retrain/run.py``: this file
only wires them, and imports nothing heavy at parse time. See ``dags/README.md`` for running it
and for the params.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

from recsys_moe.retrain.run import DAG_ID, RetrainRun, airflow_params, interval_day, resolve_run

log = logging.getLogger(__name__)

SCHEDULE = os.environ.get("RECSYS_MOE_RETRAIN_SCHEDULE", "@daily")


def _resolve(context: Any) -> RetrainRun:
    """This run's params and output paths, from the task's context."""
    day = interval_day(
        context.get("data_interval_start"),
        context.get("data_interval_end"),
        getattr(context.get("dag_run"), "run_after", None),
    )
    return resolve_run(dict(context.get("params") or {}), DAG_ID, day)


def _run() -> RetrainRun:
    return _resolve(get_current_context())


def _on_failure(context: Any) -> None:
    """Log what failed, for which day, on which try, and where its outputs live."""
    ti = context.get("ti")
    try:
        where = str(_resolve(context).run_dir)
    except Exception as exc:  # a callback must not fail itself
        where = f"? ({exc})"
    log.error(
        "%s: task %s failed (try %s of %s) for logical date %s; outputs under %s; error: %r",
        DAG_ID,
        getattr(ti, "task_id", "?"),
        getattr(ti, "try_number", "?"),
        (getattr(ti, "max_tries", 0) or 0) + 1,
        context.get("logical_date"),
        where,
        context.get("exception"),
    )


DEFAULT_ARGS = {
    "owner": "recsys-moe",
    "retries": int(os.environ.get("RECSYS_MOE_RETRAIN_RETRIES", "2")),
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": _on_failure,
    "on_retry_callback": _on_failure,
}


@dag(
    dag_id=DAG_ID,
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # the gate compares with *the* champion: one run at a time
    default_args=DEFAULT_ARGS,
    params={name: Param(**spec) for name, spec in airflow_params().items()},
    tags=["recsys-moe", "ranking", "retrain"],
    doc_md=__doc__,
)
def retrain_ranking() -> None:
    @task
    def build_features() -> dict:
        from recsys_moe.retrain import steps

        return steps.build_features(_run()).to_xcom()

    @task
    def train(features: dict) -> dict:
        from recsys_moe.retrain import steps

        return steps.train_model(_run()).to_xcom()

    @task
    def evaluate(trained: dict) -> dict:
        from recsys_moe.retrain import steps

        return steps.evaluate(_run(), steps.Trained.model_validate(trained)).to_xcom()

    @task
    def register(trained: dict, decision: dict) -> dict:
        from recsys_moe.retrain import steps

        trained_, decision_ = steps.Trained.model_validate(trained), steps.GateResult.model_validate(decision)
        return steps.register(_run(), trained_, decision_).to_xcom()

    @task.branch
    def promote_or_keep(decision: dict, registration: dict) -> str:
        return "promote" if decision["promote"] else "keep"

    @task
    def promote(registration: dict) -> dict:
        from recsys_moe.retrain import steps

        return steps.apply_decision(_run(), steps.Registration.model_validate(registration), promote=True).to_xcom()

    @task
    def keep(registration: dict) -> dict:
        from recsys_moe.retrain import steps

        return steps.apply_decision(_run(), steps.Registration.model_validate(registration), promote=False).to_xcom()

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def score_next_period() -> dict:
        from recsys_moe.retrain import steps

        return steps.score_next_period(_run()).to_xcom()

    @task
    def publish_summary(features: dict, trained: dict, decision: dict, registration: dict, scores: dict) -> dict:
        from recsys_moe.retrain import steps

        return steps.summarize(
            _run(),
            steps.Features.model_validate(features),
            steps.Trained.model_validate(trained),
            steps.GateResult.model_validate(decision),
            steps.Registration.model_validate(registration),
            steps.PeriodScores.model_validate(scores),
        )

    features = build_features()
    trained = train(features)
    decision = evaluate(trained)
    registration = register(trained, decision)
    branch = promote_or_keep(decision, registration)
    aliases = [promote(registration), keep(registration)]
    branch >> aliases
    scores = score_next_period()
    aliases >> scores
    publish_summary(features, trained, decision, registration, scores)


retrain_ranking()
