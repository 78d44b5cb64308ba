"""The retraining DAG's settings and what its sensors wait for, without Airflow.

`DagSettings` is read from the environment at parse time; `check_inputs` is what the sensors poke
(`wait_for_events` before build_features, `wait_for_candidates` before score_next_period).
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys_moe.retrain import steps
from recsys_moe.retrain.run import DagSettings, RetrainParams, RetrainRun, airflow_params, resolve_run

DAY = date(2026, 1, 8)


def test_settings_defaults_are_the_documented_ones() -> None:
    s = DagSettings.from_env({"PATH": "/bin"})  # unrelated variables are ignored
    assert s.schedule == "@daily" and s.retries == 2
    assert (s.retry_delay, s.max_retry_delay) == (timedelta(minutes=2), timedelta(minutes=30))
    assert (s.poke_interval, s.wait_timeout) == (timedelta(minutes=5), timedelta(hours=6))
    assert (s.train_timeout, s.step_timeout, s.light_timeout) == (
        timedelta(hours=6),
        timedelta(hours=1),
        timedelta(minutes=10),
    )
    assert s.train_timeout > s.step_timeout > s.light_timeout  # train may run longest
    assert s.params == RetrainParams()  # the params keep their own defaults
    readme = (Path(__file__).resolve().parents[1] / "dags" / "README.md").read_text()
    for env in DagSettings.env_names().values():
        assert f"`{env}`" in readme, f"{env} is not documented in dags/README.md"


def test_settings_from_env_parse_durations_and_none() -> None:
    s = DagSettings.from_env(
        {
            "RECSYS_MOE_RETRAIN_SCHEDULE": "none",
            "RECSYS_MOE_RETRAIN_RETRIES": "0",
            "RECSYS_MOE_RETRAIN_TRAIN_TIMEOUT": "8h",
            "RECSYS_MOE_RETRAIN_STEP_TIMEOUT": "90m",
            "RECSYS_MOE_RETRAIN_LIGHT_TIMEOUT": "45",
            "RECSYS_MOE_RETRAIN_POKE_INTERVAL": "PT30S",  # ISO 8601 too
            "RECSYS_MOE_RETRAIN_WAIT_TIMEOUT": "1.5d",
        }
    )
    assert s.schedule is None and s.retries == 0
    assert s.train_timeout == timedelta(hours=8) and s.step_timeout == timedelta(minutes=90)
    assert s.light_timeout == timedelta(seconds=45) and s.poke_interval == timedelta(seconds=30)
    assert s.wait_timeout == timedelta(hours=36)
    assert DagSettings.from_env({"RECSYS_MOE_RETRAIN_SCHEDULE": "0 3 * * *"}).schedule == "0 3 * * *"
    assert DagSettings.from_env({"RECSYS_MOE_RETRAIN_WAIT_TIMEOUT": "0"}).wait_timeout == timedelta(0)


def test_settings_set_the_params_defaults_of_a_deployment() -> None:
    """What scheduled runs (no conf) use: the real event log, no synthetic emission."""
    s = DagSettings.from_env(
        {"RECSYS_MOE_RETRAIN_PARAMS": '{"source_dir": "/data/events", "synthetic": {"emit": false}, "window_days": 14}'}
    )
    params = airflow_params(s.params)
    assert params["source_dir"]["default"] == "/data/events" and params["window_days"]["default"] == 14
    assert params["synthetic"]["default"]["emit"] is False
    assert params["synthetic"]["default"]["n_users"] == 5_000  # the unnamed fields keep their defaults
    assert params["window_days"]["minimum"] == 3 and params["arch"]["default"] == "mmoe"  # schema unchanged
    assert airflow_params()["source_dir"]["default"] is None


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RECSYS_MOE_RETRAIN_TRAIN_TIMEOUTS": "1h"}, "RECSYS_MOE_RETRAIN_TRAIN_TIMEOUTS"),  # a typo names itself
        ({"RECSYS_MOE_RETRAIN_RETRIES": "-1"}, "retries"),
        ({"RECSYS_MOE_RETRAIN_TRAIN_TIMEOUT": "0s"}, "longer than 0"),
        ({"RECSYS_MOE_RETRAIN_POKE_INTERVAL": "soon"}, "poke_interval"),
        ({"RECSYS_MOE_RETRAIN_PARAMS": '{"windows_days": 3}'}, "params.windows_days"),
        ({"RECSYS_MOE_RETRAIN_PARAMS": '{"window_days": 2}'}, "params.window_days"),
        ({"RECSYS_MOE_RETRAIN_PARAMS": "{window_days: 5}"}, "params"),  # not JSON
    ],
)
def test_settings_reject_typos_and_bad_values(env: dict[str, str], match: str) -> None:
    with pytest.raises((ValueError, ValidationError), match=match):
        DagSettings.from_env(env)


def _run(source: Path, window_days: int = 4, emit: bool = False) -> RetrainRun:
    params = {"window_days": window_days, "source_dir": str(source), "home": str(source.parent / "home")}
    params["synthetic"] = {"emit": emit, "n_users": 30, "n_items": 20, "impressions_per_day": 50, "seed": 1}
    return resolve_run(params, "retrain_ranking", DAY)


def test_sensors_wait_for_the_window_then_the_next_day(tmp_path: Path) -> None:
    source = tmp_path / "events"
    run = _run(source)
    assert steps.wait_days(run, "events") == [date(2026, 1, 5), date(2026, 1, 6), date(2026, 1, 7), DAY]
    assert steps.wait_days(run, "candidates") == [date(2026, 1, 9)]

    check = steps.check_inputs(run, "events")  # nothing landed yet: every input is named
    assert not check.ready and check.days == ["2026-01-05", "2026-01-06", "2026-01-07", "2026-01-08"]
    assert check.missing == [
        str(source / "users.parquet"),
        str(source / "items.parquet"),
        *(str(source / "impressions" / f"day=2026-01-0{d}") for d in (5, 6, 7, 8)),
    ]

    feed = run.params.synthetic
    steps.ensure_events(source, [date(2026, 1, 5), date(2026, 1, 6), date(2026, 1, 8)], feed)
    (source / "impressions" / "day=2026-01-07").mkdir()  # a writer that has not landed a file yet
    check = steps.check_inputs(run, "events")
    assert check.missing == [str(source / "impressions" / "day=2026-01-07")]
    message = steps.wait_timeout_message(check, timedelta(hours=6, seconds=3), timedelta(hours=6))
    assert "window's events (2026-01-05..2026-01-08)" in message and str(source) in message
    assert "within 6:00:00 (waited 6:00:03)" in message and message.endswith("missing: " + check.missing[0])

    steps.ensure_events(source, [date(2026, 1, 7)], feed)  # fills the empty partition
    assert steps.check_inputs(run, "events").ready
    candidates = steps.check_inputs(run, "candidates")
    assert candidates.missing == [str(source / "impressions" / "day=2026-01-09")]
    assert "next day's candidates (2026-01-09..2026-01-09)" in steps.wait_timeout_message(
        candidates, timedelta(0), timedelta(0)
    )
    (source / "items.parquet").unlink()  # a side table is an input too
    assert str(source / "items.parquet") in steps.check_inputs(run, "candidates").missing


def test_emit_events_writes_the_window_and_the_next_day_only_when_asked(tmp_path: Path) -> None:
    upstream = _run(tmp_path / "upstream", emit=False)
    emitted = steps.emit_events(upstream)
    assert not emitted.emit and emitted.days == [] and not (tmp_path / "upstream").exists()

    run = _run(tmp_path / "events", emit=True)
    emitted = steps.emit_events(run)
    assert emitted.days == ["2026-01-05", "2026-01-06", "2026-01-07", "2026-01-08", "2026-01-09"]
    assert steps.check_inputs(run, "events").ready and steps.check_inputs(run, "candidates").ready
    assert steps.emit_events(run).days == []  # present days are never rewritten
