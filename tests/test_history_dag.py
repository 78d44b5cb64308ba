"""The history-features DAG (`dags/history_features.py`) for real: `airflow dags test` on SQLite runs
its mapped units for a day, and the day partition it writes is the one `recsys-moe history` writes
(and the in-memory build's)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from recsys_moe.features import load_spec
from recsys_moe.pipelines.event_log import history_step
from recsys_moe.pipelines.history import day_path
from recsys_moe.pipelines.sources import events, synthetic
from tests.test_dag import AIRFLOW, _airflow_env, _run

DAG_ID = "history_features"
ROOT = Path(__file__).resolve().parents[1]


def _task_instances(db: Path, run_day: str) -> dict[str, list[tuple[int, str]]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT ti.task_id, ti.map_index, ti.state FROM task_instance ti JOIN dag_run r"
            " ON ti.dag_id = r.dag_id AND ti.run_id = r.run_id WHERE ti.dag_id = ? AND r.logical_date LIKE ?",
            (DAG_ID, f"{run_day}%"),
        ).fetchall()
    out: dict[str, list[tuple[int, str]]] = {}
    for task, index, state in rows:
        out.setdefault(task, []).append((index, state))
    return {k: sorted(v) for k, v in out.items()}


PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags["history_features"]
print("RESULT " + json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "heavy": [m for m in ("torch", "polars", "mlflow", "recsys_moe") if m in sys.modules],
    "mapped": sorted(t.task_id for t in dag.tasks if t.is_mapped),
    "tasks": sorted(t.task_id for t in dag.tasks),
}))
"""


def test_the_dag_parses_light_with_three_mapped_tasks(tmp_path: Path) -> None:
    out = _run(
        [sys.executable, "-c", PARSE, str(ROOT / "dags" / "history_features.py")], _airflow_env(tmp_path), tmp_path
    )
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["errors"] == {} and result["heavy"] == []  # nothing but Airflow at parse time
    assert result["mapped"] == ["check", "duplicates", "features"]
    assert {"plan", "assemble"} <= set(result["tasks"])


def test_mapped_units_of_a_day_under_airflow_dags_test_equal_the_cli(tmp_path: Path) -> None:
    config = synthetic.SyntheticConfig(n_users=500, n_items=200, n_impressions=24_000, n_days=12, seed=2)
    raw = tmp_path / "raw"
    synthetic.write(synthetic.generate(config), raw)
    env = _airflow_env(tmp_path)
    _run([str(AIRFLOW), "db", "migrate"], env, tmp_path)
    conf = {"source_dir": str(raw), "out_dir": str(tmp_path / "airflow_out"), "buckets": 3, "id_buckets": 2}

    # The run of Jan 11 computes Jan 10: it checks Jan 1..10 (its look-back), maps every bucket.
    _run([str(AIRFLOW), "dags", "test", DAG_ID, "2026-01-11", "-c", json.dumps(conf)], env, tmp_path)
    tis = _task_instances(tmp_path / "airflow.db", "2026-01-11")
    assert tis["check"] == [(i, "success") for i in range(10)]
    assert tis["duplicates"] == [(i, "success") for i in range(2)]
    assert tis["features"] == [(i, "success") for i in range(6)]  # (user_id, item_id) x 3 buckets
    assert tis["plan"] == tis["assemble"] == tis["days_to_check"] == [(-1, "success")]
    # The next day's run checks only its own day: the look-back was checked by the run before.
    _run([str(AIRFLOW), "dags", "test", DAG_ID, "2026-01-12", "-c", json.dumps(conf)], env, tmp_path)
    assert _task_instances(tmp_path / "airflow.db", "2026-01-12")["check"] == [(0, "success")]

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_moe.cli",
            "history",
            "--data",
            str(raw),
            "--out",
            str(tmp_path / "cli_out"),
            "--days",
            "2026-01-10..2026-01-11",
            "--buckets",
            "3",
            "--id-buckets",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert cli.returncode == 0, cli.stderr
    history_step(
        load_spec("synthetic_history"),
        events.joined(raw, with_day=True).with_row_index("__raw_row"),
        tmp_path / "memory",
        progress=False,
    )
    import datetime as dt

    for day in (dt.date(2026, 1, 10), dt.date(2026, 1, 11)):
        written = day_path(tmp_path / "airflow_out", day).read_bytes()
        assert written == day_path(tmp_path / "cli_out", day).read_bytes()
        assert written == day_path(tmp_path / "memory", day).read_bytes()
    assert sorted(p.name for p in (tmp_path / "airflow_out").glob("day=*")) == ["day=2026-01-10", "day=2026-01-11"]
