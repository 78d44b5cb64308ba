"""The retraining DAG the way an Airflow deployment runs it: a scheduler, not `airflow dags test`.

A PostgreSQL metadata DB (a throwaway server from `tests/postgres.py`), the LocalExecutor, and the
Airflow 3 processes a deployment runs: `airflow api-server` (the tasks talk to its Execution
API), `airflow scheduler` (whose LocalExecutor runs the tasks) and `airflow dag-processor`. The DAG
is serialized with `airflow dags reserialize`, unpaused, and its runs are created with
`airflow dags trigger --logical-date`, as the commands in dags/README.md say:

1. Jan 9 (works on Jan 8), with no conf: the params' defaults that the deployment sets
   (`RECSYS_MOE_RETRAIN_PARAMS`). It emits its synthetic events, trains, registers v1, promotes it.
2. Jan 10 (works on Jan 9) reads the same log with `synthetic.emit` off. The next day's partition
   (its candidates) is not there: `wait_for_candidates` waits in reschedule mode until the test
   lands it, then the run goes on. Its `margin` makes v2 a challenger, so v1 stays the champion.
3. `airflow tasks clear` on Jan 9's run: the scheduler runs every task again. Nothing is
   duplicated: the same versions and aliases, one training run per day, the same scores.

The MLflow store is SQLite (written by many task processes); the tracking server on PostgreSQL is
tested elsewhere. Every Airflow process runs in its own session and its process group is killed at
the end, whatever happens; on a failure their logs and the failed tasks' logs are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import IO, Any

import pytest

from tests.postgres import Postgres, free_port, postgres_server, unavailable
from tests.test_dag import AIRFLOW, DAG_ID, OVERRIDES, SYNTHETIC, _airflow_env, _digest, _run

pytestmark = pytest.mark.slow

DAY1, DAY2 = "2026-01-09T00:00:00+00:00", "2026-01-10T00:00:00+00:00"  # logical dates
DEADLINE_S = 300  # for each wait below; the whole test takes ~3 minutes on 2 cores
DEFAULTS = {"window_days": 4, "overrides": OVERRIDES, "synthetic": SYNTHETIC, "model_name": "ranker"}


class Deployment:
    """The Airflow processes of a LocalExecutor deployment on one PostgreSQL metadata DB."""

    def __init__(self, tmp: Path, pg: Postgres, url: str) -> None:
        self.tmp, self.pg = tmp, pg
        self.api_port = free_port()
        self.env = _airflow_env(tmp)
        self.env.update(
            {
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
                # Airflow derives its async URL as postgresql+asyncpg://; psycopg 3 does async itself.
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": url,
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
                # The scheduler signs the tasks' tokens and the API server checks them: one secret.
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
                # The DAG's settings: no schedule (runs come from `dags trigger` only), quick pokes.
                "RECSYS_MOE_RETRAIN_SCHEDULE": "none",
                "RECSYS_MOE_RETRAIN_POKE_INTERVAL": "2s",
                "RECSYS_MOE_RETRAIN_WAIT_TIMEOUT": "10m",
                # The params' defaults of this deployment: tiny data and model (day 1 has no conf).
                "RECSYS_MOE_RETRAIN_PARAMS": json.dumps(DEFAULTS),
            }
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, IO[bytes]] = {}

    def airflow(self, *args: str, timeout: int = 180) -> str:
        return _run([str(AIRFLOW), *args], self.env, self.tmp, timeout=timeout)

    def start(self, name: str, *args: str) -> None:
        """Start `airflow <args>` in a session of its own (so its whole group can be killed)."""
        log = self.logs[name] = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.procs[name] = subprocess.Popen(
            [str(AIRFLOW), *args],
            env=self.env,
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        """SIGTERM each process group, SIGKILL what is left after 20 s: the LocalExecutor's workers and
        their task processes, the API server's workers, the DAG processor's parsers."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)  # the group may outlive its leader
            proc.wait(timeout=10)
        for log in self.logs.values():
            log.close()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"airflow {name} exited with {proc.returncode}"

    def wait_for_api(self) -> None:
        url = f"http://127.0.0.1:{self.api_port}/execution/health"
        _wait_until(lambda: _http_ok(url), "the API server to answer", self.check_alive, 120)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(host=self.pg.host, port=self.pg.port, user=self.pg.user, dbname="airflow") as db:
            return db.execute(sql, params).fetchall()

    def run_state(self, logical_date: str) -> tuple[str, int]:
        """(state, clear_number) of the DAG's run for `logical_date`."""
        rows = self.query(
            "SELECT state, clear_number FROM dag_run WHERE dag_id = %s AND logical_date = %s", DAG_ID, logical_date
        )
        assert len(rows) == 1, rows
        return rows[0]

    def task_states(self, logical_date: str) -> dict[str, str]:
        rows = self.query(
            "SELECT ti.task_id, ti.state FROM task_instance ti JOIN dag_run r ON r.dag_id = ti.dag_id AND"
            " r.run_id = ti.run_id WHERE ti.dag_id = %s AND r.logical_date = %s",
            DAG_ID,
            logical_date,
        )
        return {task: str(state) for task, state in rows}

    def wait_for_run(self, logical_date: str, clear_number: int = 0) -> None:
        """Until the run (after `clear_number` clears) succeeds; a failed run fails at once."""

        def done() -> bool:
            state, cleared = self.run_state(logical_date)
            if cleared < clear_number:
                return False
            assert state != "failed", f"run {logical_date} failed: {self.task_states(logical_date)}"
            return state == "success"

        _wait_until(done, f"run {logical_date} to succeed", self.check_alive, DEADLINE_S)

    def dump_logs(self) -> None:
        """The processes' logs and those of every task that did not succeed, for a failed test."""
        for name in self.procs:
            print(f"===== airflow {name} =====\n{_tail(self.tmp / f'{name}.log')}")
        for path in sorted((self.tmp / "airflow" / "logs").glob(f"dag_id={DAG_ID}/run_id=*/task_id=*/attempt=*.log")):
            text = path.read_text(errors="replace")
            if '"level":"error"' in text or "Traceback" in text:
                print(f"===== {path.relative_to(self.tmp)} =====\n{text[-4000:]}")


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # start_new_session: the group id is the leader's pid
        os.killpg(proc.pid, sig)


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _wait_until(ready: Callable[[], bool], what: str, check: Callable[[], None], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        check()
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(1)


def _day_state(registry: Any, home: Path, day: str) -> dict[str, Any]:
    """What must be the same after a day is re-run: versions, aliases, the day's training run and
    model version, the scores (their file and the digests its completion record holds)."""
    run_dir = home / "retrain" / DAG_ID / day
    summary = json.loads((run_dir / "summary.json").read_text())
    done = json.loads((run_dir / "scores" / "scores.parquet.done.json").read_text())
    return {
        "versions": [v["version"] for v in registry.versions("ranker")],
        "aliases": {a: registry.alias_version("ranker", a) for a in ("champion", "challenger")},
        "run_id": summary["training"]["run_id"],
        "version": summary["model"]["version"],
        # A re-run reads the decision back from the version's tags, where metrics have 6 decimals.
        "decision": {
            **{k: summary["decision"][k] for k in ("promote", "reason", "champion_version", "rows")},
            **{k: _rounded(summary["decision"][k]) for k in ("candidate", "champion")},
        },
        "scores": _digest([run_dir / "scores" / "scores.parquet"]),
        "scores_record": {k: done[k] for k in ("input_sha256", "output_sha256", "rows_in", "rows_out") if k in done},
        "summary_scores": summary["scores"],
        "features": summary["features"],
    }


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(f"{v:.6f}") for k, v in metrics.items()}


def _training_runs(registry: Any) -> dict[str, int]:
    """Training runs per day (the `retrain.interval` tag) in the retraining experiment."""
    experiment = registry.client.get_experiment_by_name("recsys-moe/retrain")
    runs = registry.client.search_runs([experiment.experiment_id], max_results=100)
    counts: dict[str, int] = {}
    for run in runs:
        day = run.data.tags.get("retrain.interval", "?")
        counts[day] = counts.get(day, 0) + 1
    return counts


def test_two_days_and_a_rerun_under_the_scheduler_on_postgres(tmp_path: Path) -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("psycopg", reason="needs psycopg 3 (the postgres extra) for the metadata DB")
    from recsys_moe.registry.versions import Registry
    from recsys_moe.retrain.run import SyntheticFeed
    from recsys_moe.retrain.steps import ensure_events

    home = tmp_path / "home"
    events = home / "events" / "synthetic"
    with postgres_server() as pg:
        deployment = Deployment(tmp_path, pg, pg.create_database("airflow"))
        try:
            deployment.airflow("db", "migrate", timeout=300)
            # Serialize the DAG now rather than at the DAG processor's first pass, and before it
            # starts: both insert the bundle's row into a fresh DB, and the loser of that race exits.
            deployment.airflow("dags", "reserialize")
            assert DAG_ID in deployment.airflow("dags", "list", "-o", "plain")
            deployment.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(deployment.api_port))
            deployment.start("scheduler", "scheduler")
            deployment.start("dag-processor", "dag-processor")
            deployment.airflow("dags", "unpause", DAG_ID)
            deployment.wait_for_api()

            # Day 1, with the deployment's defaults (no conf): emits its events, trains, promotes v1.
            deployment.airflow("dags", "trigger", DAG_ID, "--logical-date", DAY1)
            deployment.wait_for_run(DAY1)
            states = deployment.task_states(DAY1)
            assert states["promote"] == "success" and states["keep"] == "skipped", states

            # Day 2 on the same log, events from "upstream": the next day's partition lands late.
            day2 = {"synthetic": {**SYNTHETIC, "emit": False}, "source_dir": str(events), "margin": 1.0}
            deployment.airflow("dags", "trigger", DAG_ID, "--logical-date", DAY2, "-c", json.dumps(day2))

            def day2_waits() -> bool:
                states = deployment.task_states(DAY2)
                assert states.get("wait_for_candidates") not in ("success", "failed", "upstream_failed"), states
                return states.get("wait_for_candidates") == "up_for_reschedule"

            _wait_until(day2_waits, "day 2 to wait for its candidates", deployment.check_alive, DEADLINE_S)
            assert not (events / "impressions" / "day=2026-01-10").exists()
            ensure_events(events, [date(2026, 1, 10)], SyntheticFeed.model_validate(SYNTHETIC))
            deployment.wait_for_run(DAY2)
            states = deployment.task_states(DAY2)
            assert states["keep"] == "success" and states["promote"] == "skipped", states
            ((pokes,),) = deployment.query(
                "SELECT COUNT(*) FROM task_reschedule r JOIN task_instance ti ON ti.id = r.ti_id"
                " WHERE ti.dag_id = %s AND ti.task_id = 'wait_for_candidates'",
                DAG_ID,
            )
            assert pokes >= 1, "the candidates' sensor never gave its slot back"

            # Each run worked on the day before its logical date (not on the day it was triggered).
            assert sorted(p.name for p in (home / "retrain" / DAG_ID).iterdir()) == ["2026-01-08", "2026-01-09"]
            registry = Registry(deployment.env["MLFLOW_TRACKING_URI"])
            before = _day_state(registry, home, "2026-01-08")
            assert before["versions"] == [2, 1] and before["aliases"] == {"champion": "1", "challenger": "2"}
            assert before["features"]["rows"] == {"train": 8_000, "valid": 4_000, "test": 4_000}  # the defaults
            assert before["summary_scores"]["champion"] == "1" and before["summary_scores"]["rows_scored"] == 4_000
            assert _training_runs(registry) == {"2026-01-08": 1, "2026-01-09": 1}
            summary2 = json.loads((home / "retrain" / DAG_ID / "2026-01-09" / "summary.json").read_text())
            assert summary2["scores"]["day"] == "2026-01-10" and summary2["scores"]["champion"] == "1"

            # Re-run day 1: clear its run; the scheduler runs every task again.
            deployment.airflow("tasks", "clear", DAG_ID, "-s", DAY1, "-e", DAY1, "-y")
            deployment.wait_for_run(DAY1, clear_number=1)
            assert deployment.run_state(DAY2) == ("success", 0)  # only day 1 was cleared
            after = _day_state(registry, home, "2026-01-08")
            assert after == before
            assert _training_runs(registry) == {"2026-01-08": 1, "2026-01-09": 1}
            summary1 = json.loads((home / "retrain" / DAG_ID / "2026-01-08" / "summary.json").read_text())
            assert summary1["training"]["reused"] and summary1["decision"]["reused"]
            assert not summary1["model"]["created"]

            out = deployment.airflow("dags", "list-runs", DAG_ID, "-o", "json")
            runs = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("[")))
            assert sorted((r["logical_date"][:10], r["state"]) for r in runs) == [
                ("2026-01-09", "success"),
                ("2026-01-10", "success"),
            ]
        except BaseException:
            deployment.dump_logs()
            raise
        finally:
            deployment.stop()
