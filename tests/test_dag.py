"""The retraining DAG: it parses fast with the expected graph, and runs for real under Airflow.

The end-to-end test runs `airflow dags test` (a real Airflow 3 on a temporary SQLite metadata
DB) against a temporary MLflow store for two consecutive days, the second on degraded data, then
re-runs the first day; another runs a day whose partition never lands, so its sensor times out.
Airflow runs in subprocesses so its configuration and logging never leak into the rest of the test
session. `tests/test_dag_scheduler.py` runs the DAG under a real scheduler on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
DAG_FILE = DAGS / "retrain_ranking.py"
AIRFLOW = Path(sys.executable).parent / "airflow"
DAG_ID = "retrain_ranking"

EXPECTED_DOWNSTREAM = {
    "emit_events": {"wait_for_events"},
    "wait_for_events": {"build_features"},
    "build_features": {"train", "publish_summary"},
    "train": {"evaluate", "register", "publish_summary"},
    "evaluate": {"register", "promote_or_keep", "publish_summary"},
    "register": {"promote_or_keep", "promote", "keep", "publish_summary"},
    "promote_or_keep": {"promote", "keep"},
    "promote": {"wait_for_candidates"},
    "keep": {"wait_for_candidates"},
    "wait_for_candidates": {"score_next_period"},
    "score_next_period": {"publish_summary"},
    "publish_summary": set(),
}
# Tiny but learnable: 4 days of 4,000 impressions (2 train, 1 valid, 1 test), a small MMoE, 2 epochs.
SYNTHETIC = {"emit": True, "n_users": 400, "n_items": 300, "impressions_per_day": 4_000, "seed": 3}
OVERRIDES = ["train.epochs=2", "model.num_experts=2", "model.expert_hidden=[32]", "model.bottom_hidden=[64]"]


def _airflow_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(tmp / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp / 'airflow.db'}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlruns.db'}",
            "RECSYS_MOE_CACHE": str(tmp / "cache"),
            "RECSYS_MOE_HOME": str(tmp / "home"),
            "RECSYS_MOE_RETRAIN_RETRIES": "0",  # fail fast here instead of waiting out the backoff
        }
    )
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> str:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    command = " ".join(a for a in args[:4] if len(a) < 80)
    assert proc.returncode == 0, f"{command} failed (rc {proc.returncode}):\n{out[-6000:]}"
    return out


# -- parsing -----------------------------------------------------------------------------------
PARSE_TIME_MODULES = {"recsys_moe", "recsys_moe.config", "recsys_moe.retrain", "recsys_moe.retrain.run"}
PARSE_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, time
    from airflow.dag_processing.dagbag import DagBag

    start = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1])
    wall = time.perf_counter() - start
    dag = bag.dags.get("retrain_ranking")
    out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dags),
           "wall_s": wall, "file_s": sum(s.duration.total_seconds() for s in bag.dagbag_stats),
           "heavy": [m for m in ("torch", "torchrec", "polars", "mlflow") if m in sys.modules],
           "recsys_moe": sorted(m for m in sys.modules if m.startswith("recsys_moe"))}
    if dag is not None:
        out["downstream"] = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
        out["trigger_rules"] = {t.task_id: getattr(t.trigger_rule, "value", t.trigger_rule) for t in dag.tasks}
        out["retries"] = {t.task_id: [t.retries, t.retry_exponential_backoff, t.on_failure_callback is not None]
                          for t in dag.tasks}
        out["execution_timeout"] = {t.task_id: t.execution_timeout.total_seconds() for t in dag.tasks}
        out["sensors"] = {t.task_id: [t.mode, t.poke_interval, t.timeout] for t in dag.tasks
                          if getattr(t, "_is_sensor", False)}
        out["params"] = sorted(dag.params.keys())
        out["param_defaults"] = dag.params.dump()
        out["timetable"] = repr(dag.timetable)
        out["max_active_runs"] = dag.max_active_runs
        callback = dag.default_args["on_failure_callback"]
        records = []
        logger = callback.__globals__["log"]
        logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(self.format(r))})())
        logger.setLevel(logging.INFO)

        class TI:
            task_id, try_number, max_tries = "train", 2, 2

        from datetime import datetime, timezone
        end = datetime(2026, 1, 9, tzinfo=timezone.utc)
        callback({"ti": TI(), "logical_date": end, "data_interval_start": end, "data_interval_end": end,
                  "params": {"home": "/srv/recsys"}, "exception": RuntimeError("boom")})
        out["callback_log"] = records
    print("RESULT " + json.dumps(out))
    """
)


def test_dagbag_parses_fast_with_expected_graph(tmp_path: Path) -> None:
    env = _airflow_env(tmp_path)
    del env["RECSYS_MOE_RETRAIN_RETRIES"]  # the DAG's own defaults
    out = _run([sys.executable, "-c", PARSE_SCRIPT, str(DAG_FILE)], env, tmp_path, timeout=120)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["errors"] == {}
    assert result["dag_ids"] == [DAG_ID]
    assert result["file_s"] < 1.0 and result["wall_s"] < 1.0, result
    assert result["heavy"] == [], f"the DAG file imports {result['heavy']} at parse time"
    # Only the light modules that hold the DAG's id, params and architecture list.
    assert set(result["recsys_moe"]) <= PARSE_TIME_MODULES, result["recsys_moe"]
    assert {k: set(v) for k, v in result["downstream"].items()} == EXPECTED_DOWNSTREAM
    # After the branch, one of promote/keep is skipped: the candidates' sensor runs after either.
    assert result["trigger_rules"]["wait_for_candidates"] == "none_failed_min_one_success"
    assert result["trigger_rules"]["score_next_period"] == "all_success"
    assert all(r == [2, True, True] for r in result["retries"].values())  # retries with backoff, callback
    # The waits are sensors with a timeout (6 h, a poke every 5 min, the slot given back in between).
    assert result["sensors"] == {
        "wait_for_events": ["reschedule", 300, 21_600],
        "wait_for_candidates": ["reschedule", 300, 21_600],
    }
    timeouts = result["execution_timeout"]  # every task has one; train the longest
    assert set(timeouts) == set(EXPECTED_DOWNSTREAM) and timeouts["train"] == 6 * 3600
    assert {k for k, v in timeouts.items() if v == 3600} == {
        "emit_events",
        "build_features",
        "evaluate",
        "register",
        "score_next_period",
    }
    assert max(v for k, v in timeouts.items() if k != "train") < timeouts["train"]
    assert {"spec", "window_days", "arch", "margin"} <= set(result["params"])
    assert "CronTriggerTimetable(expression='0 0 * * *'" in result["timetable"]  # @daily by default
    assert result["max_active_runs"] == 1
    (line,) = result["callback_log"]
    assert "task train failed (try 2 of 3)" in line and "2026-01-09" in line
    assert "/srv/recsys/retrain/retrain_ranking/2026-01-08" in line and "boom" in line


def test_dag_settings_come_from_the_environment(tmp_path: Path) -> None:
    """The parse-time settings reach the tasks; a bad one is an import error that names it."""
    env = _airflow_env(tmp_path)
    env.update(RECSYS_MOE_RETRAIN_TRAIN_TIMEOUT="8h", RECSYS_MOE_RETRAIN_WAIT_TIMEOUT="30m")
    env.update(RECSYS_MOE_RETRAIN_POKE_INTERVAL="1m", RECSYS_MOE_RETRAIN_SCHEDULE="none")
    env["RECSYS_MOE_RETRAIN_PARAMS"] = json.dumps({"source_dir": "/data/events", "synthetic": {"emit": False}})
    out = _run([sys.executable, "-c", PARSE_SCRIPT, str(DAG_FILE)], env, tmp_path, timeout=120)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["execution_timeout"]["train"] == 8 * 3600
    assert result["sensors"]["wait_for_events"] == ["reschedule", 60, 1800]
    assert "NullTimetable" in result["timetable"] and result["retries"]["train"][0] == 0
    defaults = result["param_defaults"]  # what a run without conf gets
    assert defaults["source_dir"] == "/data/events" and defaults["synthetic"]["emit"] is False
    assert defaults["window_days"] == 7 and defaults["synthetic"]["impressions_per_day"] == 30_000

    env["RECSYS_MOE_RETRAIN_TRAIN_TIMEOUT"] = "a while"
    out = _run([sys.executable, "-c", PARSE_SCRIPT, str(DAG_FILE)], env, tmp_path, timeout=120)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["dag_ids"] == [] and "train_timeout" in str(result["errors"]), result["errors"]


def test_interval_day_is_the_last_complete_day() -> None:
    from recsys_moe.retrain.run import interval_day

    jan9 = datetime(2026, 1, 9, tzinfo=UTC)
    assert interval_day(jan9, jan9) == date(2026, 1, 8)  # @daily trigger: an empty interval at midnight
    assert interval_day(jan9 - timedelta(days=1), jan9) == date(2026, 1, 8)  # a [Jan 8, Jan 9) interval
    assert interval_day(None, None, jan9 + timedelta(hours=13)) == date(2026, 1, 8)  # manual, mid-day
    # Scheduled and backfilled runs pass their logical date too.
    assert interval_day(jan9, jan9, jan9, logical_date=jan9) == date(2026, 1, 8)  # @daily
    assert interval_day(jan9 - timedelta(days=1), jan9, jan9, jan9 - timedelta(days=1)) == date(2026, 1, 8)
    # `airflow dags trigger --logical-date 2026-01-09`, a year later: Airflow 3 infers the data
    # interval from the trigger's time, an empty or a cron one; the logical date decides.
    later = datetime(2027, 1, 20, 17, 53, tzinfo=UTC)
    assert interval_day(later, later, later, logical_date=jan9) == date(2026, 1, 8)
    assert interval_day(later - timedelta(days=1), later, later, logical_date=jan9) == date(2026, 1, 8)
    assert interval_day(None, None, later, logical_date=jan9 + timedelta(hours=13)) == date(2026, 1, 8)


def test_the_run_is_typed_and_travels_as_an_xcom_dict() -> None:
    from pydantic import ValidationError

    from recsys_moe.config import ARCHITECTURES
    from recsys_moe.retrain.run import RetrainRun, airflow_params, resolve_run

    day = date(2026, 1, 8)
    run = resolve_run({"window_days": 4, "synthetic": {"n_users": 10}, "home": "/srv/x", "spec": None}, DAG_ID, day)
    assert run.window == (date(2026, 1, 5), day) and run.params.spec == "synthetic"  # None: the default
    assert run.params.synthetic.n_users == 10 and run.params.synthetic.emit  # unset fields keep their defaults
    assert run.run_dir == Path("/srv/x/retrain/retrain_ranking/2026-01-08") and run.source_dir == Path(
        "/srv/x/events/synthetic"
    )
    assert RetrainRun.model_validate(json.loads(json.dumps(run.to_xcom()))) == run
    with pytest.raises(ValidationError, match="windows_days"):  # a misspelt param is an error, not ignored
        resolve_run({"windows_days": 3}, DAG_ID, day)
    with pytest.raises(ValidationError, match="unknown architecture 'transformer'"):
        resolve_run({"arch": "transformer"}, DAG_ID, day)
    params = airflow_params()
    assert params["arch"]["enum"] == list(ARCHITECTURES) and params["window_days"]["minimum"] == 3
    assert params["synthetic"]["default"]["impressions_per_day"] == 30_000
    # The gate's baseline requirement (the registry gate's, tests/test_registry.py) is a param too.
    assert params["beat_baselines_by"]["type"] == ["number", "null"] and params["beat_baselines_by"]["default"] is None
    assert resolve_run({"beat_baselines_by": 0.01}, DAG_ID, day).params.beat_baselines_by == 0.01


def test_synthetic_days_are_deterministic_and_distinct(tmp_path: Path) -> None:
    from recsys_moe.pipelines.sources import synthetic

    config = synthetic.SyntheticConfig(n_users=50, n_items=40, n_impressions=300, seed=1)
    a, b = synthetic.generate_day(config, date(2026, 1, 8)), synthetic.generate_day(config, date(2026, 1, 9))
    assert a.impressions.equals(synthetic.generate_day(config, date(2026, 1, 8)).impressions)
    assert a.users.equals(b.users) and a.items.equals(b.items)  # one world
    assert not a.impressions["user_id"].equals(b.impressions["user_id"])  # different events
    assert set(a.impressions["impression_id"]).isdisjoint(b.impressions["impression_id"])
    synthetic.write_partitions(a, tmp_path)
    synthetic.write_partitions(b, tmp_path)  # a log grows a day at a time
    assert sorted(p.name for p in (tmp_path / "impressions").iterdir()) == ["day=2026-01-08", "day=2026-01-09"]
    assert synthetic.read(tmp_path)[2].collect().height == 600


# -- the whole DAG under Airflow, two days -------------------------------------------------------
def _degraded_source(directory: Path, day: date, window_days: int) -> None:
    """The events of `day`'s window with shuffled labels on every day but the test day (whose rows
    are the holdout) and the next day (the candidates): a broken upstream feed."""
    from recsys_moe.retrain.run import SyntheticFeed
    from recsys_moe.retrain.steps import ensure_events

    days = [day - timedelta(days=i) for i in range(-1, window_days)]
    ensure_events(directory, days, SyntheticFeed.model_validate(SYNTHETIC))
    rng = np.random.default_rng(0)
    for i in range(1, window_days):
        path = directory / "impressions" / f"day={(day - timedelta(days=i)).isoformat()}" / "part-0.parquet"
        frame = pl.read_parquet(path)
        perm = rng.permutation(frame.height)
        frame.with_columns(pl.col("click").gather(perm), pl.col("conversion").gather(perm)).write_parquet(path)


def _task_states(airflow_db: Path, logical_date: str) -> dict[str, str]:
    with sqlite3.connect(airflow_db) as db:
        (run_id,) = db.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = ? AND logical_date LIKE ? ORDER BY id DESC LIMIT 1",
            (DAG_ID, f"{logical_date}%"),
        ).fetchone()
        rows = db.execute("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id))
        return dict(rows.fetchall())


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.read_bytes())
    return h.hexdigest()


def _day_outputs(run_dir: Path) -> dict[str, object]:
    """What must not change when a day is re-run: the data, the model, the scores."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "features": _digest(list((run_dir / "features").glob("*/part-*.parquet"))),
        "model": _digest([run_dir / "model" / "best" / "model.safetensors"]),
        "scores": pl.read_parquet(run_dir / "scores" / "scores.parquet").sort("impression_id"),
        "run_id": summary["training"]["run_id"],
        "version": summary["model"]["version"],
    }


def test_two_days_under_airflow_dags_test(tmp_path: Path) -> None:
    env = _airflow_env(tmp_path)
    home, uri = tmp_path / "home", env["MLFLOW_TRACKING_URI"]
    _run([str(AIRFLOW), "db", "migrate"], env, tmp_path)
    conf = {"window_days": 4, "overrides": OVERRIDES, "synthetic": SYNTHETIC, "model_name": "ranker"}

    def dags_test(logical_date: str, **extra: object) -> None:
        _run([str(AIRFLOW), "dags", "test", DAG_ID, logical_date, "-c", json.dumps({**conf, **extra})], env, tmp_path)

    from recsys_moe.registry.versions import Registry

    registry = Registry(uri)
    day1_dir = home / "retrain" / DAG_ID / "2026-01-08"
    day2_dir = home / "retrain" / DAG_ID / "2026-01-09"

    # Day 1 (the run at midnight of Jan 9 works on Jan 8): the first model becomes the champion.
    dags_test("2026-01-09")
    states = _task_states(tmp_path / "airflow.db", "2026-01-09")
    assert states["promote"] == "success" and states["keep"] == "skipped", states
    assert states["publish_summary"] == "success"
    assert [v["version"] for v in registry.versions("ranker")] == [1]
    assert registry.alias_version("ranker", "champion") == "1"
    tags = registry.client.get_model_version("ranker", "1").tags
    assert tags["gate.decision"] == "promoted" and tags["gate.reason"] == "no champion yet"
    assert tags["retrain.interval"] == "2026-01-08" and tags["retrain.dag_id"] == DAG_ID
    summary1 = json.loads((day1_dir / "summary.json").read_text())
    assert summary1["promoted"] and summary1["model"]["version"] == "1"
    assert summary1["features"]["rows"] == {"train": 8_000, "valid": 4_000, "test": 4_000}
    assert summary1["scores"]["day"] == "2026-01-09" and summary1["scores"]["champion"] == "1"
    assert summary1["mlflow"]["run_url"].endswith(f"/runs/{summary1['training']['run_id']}")
    scores1 = pl.read_parquet(day1_dir / "scores" / "scores.parquet")
    assert scores1.height == 4_000 and {"impression_id", "click", "conversion", "score"} <= set(scores1.columns)
    before = _day_outputs(day1_dir)

    # Day 2 on degraded data (labels shuffled in its training days): registered, not promoted.
    degraded = tmp_path / "degraded-events"
    _degraded_source(degraded, date(2026, 1, 9), window_days=4)
    dags_test("2026-01-10", source_dir=str(degraded))
    states = _task_states(tmp_path / "airflow.db", "2026-01-10")
    assert states["keep"] == "success" and states["promote"] == "skipped", states
    assert [v["version"] for v in registry.versions("ranker")] == [2, 1]
    assert registry.alias_version("ranker", "champion") == "1"
    assert registry.alias_version("ranker", "challenger") == "2"
    tags = registry.client.get_model_version("ranker", "2").tags
    assert tags["gate.decision"] == "not promoted" and "worse" in tags["gate.reason"], tags["gate.reason"]
    assert tags["gate.champion_version"] == "1" and tags["retrain.interval"] == "2026-01-09"
    summary2 = json.loads((day2_dir / "summary.json").read_text())
    assert not summary2["promoted"] and summary2["model"]["version"] == "2"
    assert summary2["decision"]["candidate"]["click.auc"] < summary2["decision"]["champion"]["click.auc"]
    # The next day's candidates are still scored, by the day-1 champion.
    assert summary2["scores"]["day"] == "2026-01-10" and summary2["scores"]["champion"] == "1"
    assert pl.read_parquet(day2_dir / "scores" / "scores.parquet").height == 4_000
    print(f"day 2: {tags['gate.reason']}")

    # Day 1 again: same outputs, no new version, no new training run, aliases untouched.
    runs_before = len(registry.client.search_runs([summary1["mlflow"]["run_url"].split("/")[-3]]))
    dags_test("2026-01-09")
    after = _day_outputs(day1_dir)
    assert after["scores"].equals(before["scores"])  # type: ignore[union-attr]
    assert {k: v for k, v in after.items() if k != "scores"} == {k: v for k, v in before.items() if k != "scores"}
    assert [v["version"] for v in registry.versions("ranker")] == [2, 1]
    assert registry.alias_version("ranker", "champion") == "1"
    assert registry.alias_version("ranker", "challenger") == "2"
    assert len(registry.client.search_runs([summary1["mlflow"]["run_url"].split("/")[-3]])) == runs_before == 2
    summary1b = json.loads((day1_dir / "summary.json").read_text())
    assert summary1b["training"]["reused"] and summary1b["decision"]["reused"] and not summary1b["model"]["created"]
    assert not list(day1_dir.glob(".*")), "temporary files left behind"


# -- a late partition: the sensor waits, then fails with what is missing -------------------------
def test_a_partition_that_never_lands_fails_its_sensor_not_retried(tmp_path: Path) -> None:
    from recsys_moe.retrain.run import SyntheticFeed
    from recsys_moe.retrain.steps import ensure_events

    env = _airflow_env(tmp_path)
    # Retries on (with no backoff worth waiting for): a sensor's timeout must still not be retried.
    env.update(RECSYS_MOE_RETRAIN_RETRIES="2", RECSYS_MOE_RETRAIN_RETRY_DELAY="1s")
    env.update(RECSYS_MOE_RETRAIN_WAIT_TIMEOUT="4s", RECSYS_MOE_RETRAIN_POKE_INTERVAL="1s")
    upstream = tmp_path / "upstream"  # an upstream feed whose Jan 7 never lands
    ensure_events(
        upstream, [date(2026, 1, 5), date(2026, 1, 6), date(2026, 1, 8)], SyntheticFeed.model_validate(SYNTHETIC)
    )
    _run([str(AIRFLOW), "db", "migrate"], env, tmp_path)
    conf = {"window_days": 4, "synthetic": {**SYNTHETIC, "emit": False}, "source_dir": str(upstream)}
    args = [str(AIRFLOW), "dags", "test", DAG_ID, "2026-01-09", "-c", json.dumps(conf)]
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "DagRun failed" in out, out[-4000:]
    missing = upstream / "impressions" / "day=2026-01-07"
    assert f"AirflowSensorTimeout: the window's events (2026-01-05..2026-01-08) did not land in {upstream}" in out
    assert re.search(r"within 0:00:04 \(waited 0:00:\d", out) and f"missing: {missing}\n" in out, out[-4000:]
    states = _task_states(tmp_path / "airflow.db", "2026-01-09")
    assert states["emit_events"] == "success" and states["wait_for_events"] == "failed", states
    assert states["build_features"] == "upstream_failed" and states["publish_summary"] == "upstream_failed"
    with sqlite3.connect(tmp_path / "airflow.db") as db:
        ((tries, pokes),) = db.execute(
            "SELECT ti.try_number, (SELECT COUNT(*) FROM task_reschedule r WHERE r.ti_id = ti.id)"
            " FROM task_instance ti WHERE ti.dag_id = ? AND ti.task_id = 'wait_for_events'",
            (DAG_ID,),
        ).fetchall()
    assert tries == 1, "a sensor timeout was retried"
    assert pokes >= 2, "the sensor did not wait in reschedule mode"  # ~1 poke/s for 4 s
    assert not (tmp_path / "home" / "retrain" / DAG_ID / "2026-01-08" / "features").exists()
