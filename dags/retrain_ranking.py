"""Scheduled retraining of the multi-task ranker (Airflow 3, TaskFlow).

build_features → train → evaluate (vs the champion) → register → promote_or_keep
→ promote | keep → score_next_period (with the champion) → publish_summary

Each run works on the last complete day before its data interval ends, and writes under
``<home>/retrain/retrain_ranking/<day>/`` (see ``recsys_moe/retrain.py``, which holds the logic of
every step: this file only wires them, and imports nothing heavy at parse time). See
``dags/README.md`` for running it and for the params.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone

from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

log = logging.getLogger(__name__)

DAG_ID = "retrain_ranking"
SCHEDULE = os.environ.get("RECSYS_MOE_RETRAIN_SCHEDULE", "@daily")
ARCHS = ["single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple"]


def _run() -> dict:
    """This run's resolved params and output paths (light: no heavy imports)."""
    from recsys_moe import retrain

    context = get_current_context()
    dag_run = context["dag_run"]
    day = retrain.interval_day(
        context.get("data_interval_start"), context.get("data_interval_end"), getattr(dag_run, "run_after", None)
    )
    return retrain.resolve_run(dict(context["params"]), dag_run.dag_id, day)


def _on_failure(context) -> None:  # type: ignore[no-untyped-def]
    """Log what failed, for which day, on which try, and where its outputs live."""
    ti = context.get("ti")
    where = "?"
    try:
        from recsys_moe import retrain

        day = retrain.interval_day(context.get("data_interval_start"), context.get("data_interval_end"),
                                   getattr(context.get("dag_run"), "run_after", None))  # fmt: skip
        where = retrain.resolve_run(dict(context.get("params") or {}), DAG_ID, day)["run_dir"]
    except Exception as exc:  # noqa: BLE001 - a callback must not fail itself
        where = f"? ({exc})"
    log.error(
        "%s: task %s failed (try %s of %s) for logical date %s; outputs under %s; error: %r",
        DAG_ID, getattr(ti, "task_id", "?"), getattr(ti, "try_number", "?"),
        (getattr(ti, "max_tries", 0) or 0) + 1, context.get("logical_date"), where, context.get("exception"),
    )  # fmt: skip


DEFAULT_ARGS = {
    "owner": "recsys-moe",
    "retries": int(os.environ.get("RECSYS_MOE_RETRAIN_RETRIES", "2")),
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": _on_failure,
    "on_retry_callback": _on_failure,
}

PARAMS = {
    "spec": Param("synthetic", type="string", description="feature spec: a bundled name or a YAML path "
                  "(its dataset source must be the day-partitioned event log)"),  # fmt: skip
    "window_days": Param(7, type="integer", minimum=3, description="days of events ending on the run's day: "
                         "training days, then the spec's validation and test days"),  # fmt: skip
    "arch": Param("mmoe", type="string", enum=ARCHS, description="model architecture (model.arch)"),
    "margin": Param(0.0, type="number", minimum=0, description="mean holdout improvement over the champion "
                    "needed to promote"),  # fmt: skip
    "tolerance": Param(0.002, type="number", minimum=0, description="largest regression allowed on any metric"),
    "model_name": Param("recsys-ranker", type="string", description="registered model name"),
    "experiment": Param("recsys-moe/retrain", type="string", description="MLflow experiment of the training runs"),
    "run_config": Param(None, type=["null", "string"], description="run config YAML (e.g. configs/mmoe.yaml)"),
    "overrides": Param([], type="array", items={"type": "string"},
                       description="run config overrides, e.g. [\"train.epochs=3\"]"),  # fmt: skip
    "home": Param(None, type=["null", "string"], description="data and output root; default $RECSYS_MOE_HOME "
                  "or ~/recsys-moe"),  # fmt: skip
    "source_dir": Param(None, type=["null", "string"], description="event log (impressions/day=YYYY-MM-DD/, "
                        "users.parquet, items.parquet); default <home>/events/<spec>"),  # fmt: skip
    "tracking_uri": Param(None, type=["null", "string"], description="MLflow tracking + registry URI; default "
                          "$MLFLOW_TRACKING_URI or sqlite:///<home>/mlruns.db"),  # fmt: skip
    "synthetic": Param(
        {"emit": True, "n_users": 5_000, "n_items": 2_000, "impressions_per_day": 30_000, "seed": 0},
        type="object",
        description="emit missing days of the synthetic event log (demo, CI); emit=false when events land "
        "from upstream",
    ),
}


@dag(
    dag_id=DAG_ID,
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,  # the gate compares with *the* champion: one run at a time
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["recsys-moe", "ranking", "retrain"],
    doc_md=__doc__,
)
def retrain_ranking() -> None:
    @task
    def build_features() -> dict:
        from recsys_moe import retrain

        return retrain.build_features(_run())

    @task
    def train(features: dict) -> dict:
        from recsys_moe import retrain

        return retrain.train_model(_run())

    @task
    def evaluate(trained: dict) -> dict:
        from recsys_moe import retrain

        return retrain.evaluate(_run(), trained)

    @task
    def register(trained: dict, decision: dict) -> dict:
        from recsys_moe import retrain

        return retrain.register(_run(), trained, decision)

    @task.branch
    def promote_or_keep(decision: dict, registration: dict) -> str:
        return "promote" if decision["promote"] else "keep"

    @task
    def promote(registration: dict) -> dict:
        from recsys_moe import retrain

        return retrain.apply_decision(_run(), registration, promote=True)

    @task
    def keep(registration: dict) -> dict:
        from recsys_moe import retrain

        return retrain.apply_decision(_run(), registration, promote=False)

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def score_next_period() -> dict:
        from recsys_moe import retrain

        return retrain.score_next_period(_run())

    @task
    def publish_summary(features: dict, trained: dict, decision: dict, registration: dict, scores: dict) -> dict:
        from recsys_moe import retrain

        return retrain.summarize(_run(), features, trained, decision, registration, scores)

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
