"""History features of a day-partitioned event log, as Airflow mapped tasks (Airflow 3, TaskFlow).

plan → check (mapped over days) → duplicates (mapped over id buckets) → features (mapped over
(key column, bucket)) → assemble; three one-line tasks hand plan's lists to the mapped ones

Each run computes the point-in-time history features of one day: the last complete day before
its logical date (`recsys_moe.retrain.run.interval_day`, as the retraining DAG picks it). The
units and what each writes are in `recsys_moe/pipelines/history_units.py`; `recsys-moe history`
runs the same units in one process and writes the same files. Mapped tasks are what lets a
Celery or Kubernetes executor spread a day over many workers: no unit holds more than one day of
the log or one bucket of its look-back window.

Params: `source_dir` (the raw log: impressions/day=YYYY-MM-DD/, users.parquet, items.parquet),
`out_dir` (the day partitions, as `recsys-moe pipeline --history-dir` reads them), `work_dir`
(default <out_dir>/_units), `spec` (a spec with a history section), `buckets`, `id_buckets`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

DAG_ID = "history_features"


def _plan_and_day(params: dict[str, Any]) -> tuple[Any, Any]:
    """The run's partitioned plan and its day, from the task's context."""
    from pathlib import Path

    from recsys_moe.features import load_spec
    from recsys_moe.pipelines.history_units import Plan
    from recsys_moe.retrain.run import interval_day

    context = get_current_context()
    day = interval_day(
        context.get("data_interval_start"),
        context.get("data_interval_end"),
        getattr(context.get("dag_run"), "run_after", None),
        context.get("logical_date"),
    )
    out = Path(params["out_dir"]).expanduser()
    work = Path(params["work_dir"]).expanduser() if params.get("work_dir") else out / "_units"
    plan = Plan(
        load_spec(params["spec"]), work, out, buckets=int(params["buckets"]), id_buckets=int(params["id_buckets"])
    )
    return plan, day


def _params() -> dict[str, Any]:
    return dict(get_current_context().get("params") or {})


@dag(
    dag_id=DAG_ID,
    schedule=os.environ.get("RECSYS_MOE_HISTORY_SCHEDULE", "@daily"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # runs share the work folder's duplicates: one day at a time
    default_args={"owner": "recsys-moe", "retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "source_dir": Param("", type="string", description="the raw event log"),
        "out_dir": Param("", type="string", description="the history folder (day=YYYY-MM-DD/part-0.parquet)"),
        "work_dir": Param("", type="string", description="the units' files; default <out_dir>/_units"),
        "spec": Param("synthetic_history", type="string", description="a feature spec with a history section"),
        "buckets": Param(16, type="integer", minimum=1, description="features units per key column"),
        "id_buckets": Param(4, type="integer", minimum=1, description="duplicate-finding units"),
    },
    tags=["recsys-moe", "features"],
    doc_md=__doc__,
)
def history_features() -> None:
    @task
    def plan() -> dict:
        """Which units this day needs: its look-back days not checked yet, and every bucket."""
        from pathlib import Path

        from recsys_moe.pipelines.history_units import own, units_for

        params = _params()
        if not params.get("source_dir") or not params.get("out_dir"):
            raise ValueError("params source_dir and out_dir are required")
        p, day = _plan_and_day(params)
        own(p)
        return units_for(p, Path(params["source_dir"]).expanduser(), [day]).to_xcom()

    @task
    def check(day: str) -> list[int]:
        from datetime import date
        from pathlib import Path

        from recsys_moe.pipelines.history_units import run_check

        params = _params()
        p, _ = _plan_and_day(params)
        return list(run_check(p, Path(params["source_dir"]).expanduser(), date.fromisoformat(day)))

    @task
    def duplicates(bucket: int) -> int:
        from recsys_moe.pipelines.history_units import find_duplicates

        return find_duplicates(_plan_and_day(_params())[0], bucket)

    @task
    def features(unit: list) -> int:
        from datetime import date
        from pathlib import Path

        from recsys_moe.pipelines.history_units import bucket_features

        params = _params()
        column, bucket, days = unit
        source = Path(params["source_dir"]).expanduser()
        return bucket_features(
            _plan_and_day(params)[0], source, column, int(bucket), [date.fromisoformat(d) for d in days]
        )

    @task
    def assemble() -> dict:
        from recsys_moe.pipelines.history import day_path
        from recsys_moe.pipelines.history_units import assemble_day, finish

        p, day = _plan_and_day(_params())
        rows = assemble_day(p, day)
        finish(p)
        return {"day": day.isoformat(), "rows": rows, "path": str(day_path(p.out_dir, day)) if rows else None}

    # Airflow maps over a task's whole return value: one small task hands each list on.
    @task
    def days_to_check(units: dict) -> list[str]:
        return list(units["check_days"])

    @task
    def id_buckets(units: dict) -> list[int]:
        return list(units["id_buckets"])

    @task
    def bucket_units(units: dict) -> list[list]:
        return list(units["feature_units"])

    units: Any = plan()  # an XCom of plan's dict
    checked = check.expand(day=days_to_check(units))
    found = duplicates.expand(bucket=id_buckets(units))
    computed = features.expand(unit=bucket_units(units))
    checked >> found >> computed >> assemble()


history_features()
