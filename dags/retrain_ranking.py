"""Scheduled retraining of the multi-task ranker (Airflow 3, TaskFlow).

emit_events → wait_for_events → build_features → train → evaluate (vs the champion) → register
→ promote_or_keep → promote | keep → wait_for_candidates → score_next_period (with the champion)
→ publish_summary

Each run works on the last complete day before its logical date (``run.interval_day``), and writes under
``<home>/retrain/retrain_ranking/<day>/``. The two sensors wait (reschedule mode, with a timeout)
for the day partitions of the event log the next task reads; lateness is waited for, not retried.
The logic of every step is in ``recsys_moe/retrain/steps.py``, the run's params and the DAG's
parse-time settings (``RECSYS_MOE_RETRAIN_*``: schedule, retries, waits, timeouts) in
``recsys_moe/retrain/run.py``: this file only wires them, and imports nothing heavy at parse time.
See ``dags/README.md`` for deploying and running it, and for the params and settings.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import Param, PokeReturnValue, TriggerRule, dag, get_current_context, task

from recsys_moe.retrain.run import DAG_ID, DagSettings, RetrainRun, airflow_params, interval_day, resolve_run

if TYPE_CHECKING:
    from recsys_moe.retrain.steps import Wait

log = logging.getLogger(__name__)

# Read once per parse from the environment, identical in the scheduler, the DAG processor and the
# workers (they all parse this file); see DagSettings for why not Airflow Variables.
SETTINGS = DagSettings.from_env()


def _resolve(context: Any) -> RetrainRun:
    """This run's params and output paths, from the task's context."""
    day = interval_day(
        context.get("data_interval_start"),
        context.get("data_interval_end"),
        getattr(context.get("dag_run"), "run_after", None),
        context.get("logical_date"),
    )
    return resolve_run(dict(context.get("params") or {}), DAG_ID, day)


def _run() -> RetrainRun:
    return _resolve(get_current_context())


def _wait(wait: Wait) -> PokeReturnValue:
    """One poke of a sensor: done when every input is there; past the wait timeout, fail with the
    paths that never appeared (a sensor timeout is never retried). The sensor's own `timeout`, the
    same value, is only a backstop: its message would not say what is missing."""
    from airflow.sdk.exceptions import AirflowSensorTimeout

    from recsys_moe.retrain import steps

    context = get_current_context()
    check = steps.check_inputs(_resolve(context), wait)
    if check.ready:
        return PokeReturnValue(is_done=True, xcom_value=check.to_xcom())
    first = context["ti"].get_first_reschedule_date(context)  # None on the first poke
    waited = datetime.now(UTC) - first if first else timedelta(0)
    if waited >= SETTINGS.wait_timeout:
        raise AirflowSensorTimeout(steps.wait_timeout_message(check, waited, SETTINGS.wait_timeout))
    log.info("waiting for %s (%s so far, timeout %s): %s", wait, waited, SETTINGS.wait_timeout, check.missing)
    return PokeReturnValue(is_done=False)


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
    "retries": SETTINGS.retries,
    "retry_delay": SETTINGS.retry_delay,
    "retry_exponential_backoff": True,
    "max_retry_delay": SETTINGS.max_retry_delay,
    "execution_timeout": SETTINGS.step_timeout,  # the tasks below that are shorter or longer say so
    "on_failure_callback": _on_failure,
    "on_retry_callback": _on_failure,
}
# Sensors give their worker slot back between pokes (reschedule mode); `timeout` counts from the
# first poke, `execution_timeout` bounds each poke.
SENSOR: dict[str, Any] = {
    "mode": "reschedule",
    "poke_interval": SETTINGS.poke_interval.total_seconds(),
    "timeout": SETTINGS.wait_timeout.total_seconds(),
    "execution_timeout": SETTINGS.light_timeout,
}


@dag(
    dag_id=DAG_ID,
    schedule=SETTINGS.schedule,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # the gate compares with *the* champion: one run at a time
    default_args=DEFAULT_ARGS,
    params={name: Param(**spec) for name, spec in airflow_params(SETTINGS.params).items()},
    tags=["recsys-moe", "ranking", "retrain"],
    doc_md=__doc__,
)
def retrain_ranking() -> None:
    @task
    def emit_events() -> dict:
        from recsys_moe.retrain import steps

        return steps.emit_events(_run()).to_xcom()

    @task.sensor(**SENSOR)
    def wait_for_events() -> PokeReturnValue:
        return _wait("events")

    @task
    def build_features() -> dict:
        from recsys_moe.retrain import steps

        return steps.build_features(_run()).to_xcom()

    @task(execution_timeout=SETTINGS.train_timeout)
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

    @task.branch(execution_timeout=SETTINGS.light_timeout)
    def promote_or_keep(decision: dict, registration: dict) -> str:
        return "promote" if decision["promote"] else "keep"

    @task(execution_timeout=SETTINGS.light_timeout)
    def promote(registration: dict) -> dict:
        from recsys_moe.retrain import steps

        return steps.apply_decision(_run(), steps.Registration.model_validate(registration), promote=True).to_xcom()

    @task(execution_timeout=SETTINGS.light_timeout)
    def keep(registration: dict) -> dict:
        from recsys_moe.retrain import steps

        return steps.apply_decision(_run(), steps.Registration.model_validate(registration), promote=False).to_xcom()

    @task.sensor(**SENSOR, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)  # one of promote/keep ran
    def wait_for_candidates() -> PokeReturnValue:
        return _wait("candidates")

    @task
    def score_next_period() -> dict:
        from recsys_moe.retrain import steps

        return steps.score_next_period(_run()).to_xcom()

    @task(execution_timeout=SETTINGS.light_timeout)
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
    emit_events() >> wait_for_events() >> features
    trained = train(features)
    decision = evaluate(trained)
    registration = register(trained, decision)
    branch = promote_or_keep(decision, registration)
    aliases = [promote(registration), keep(registration)]
    branch >> aliases
    scores = score_next_period()
    aliases >> wait_for_candidates() >> scores
    publish_summary(features, trained, decision, registration, scores)


retrain_ranking()
