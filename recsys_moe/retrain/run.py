"""One day's retraining run as a typed object: the params it was given and every path it reads and
writes. The DAG resolves it in each task (`resolve_run`) and the steps (`retrain.steps`) take it.

The DAG's parse-time settings (schedule, retries, sensor waits, execution timeouts) are a typed
`DagSettings`, read from ``RECSYS_MOE_RETRAIN_*`` environment variables (`DagSettings.from_env`).

Light on purpose: the DAG file imports this module at parse time, for its id, its params
(`airflow_params`) and its settings, so it imports nothing heavier than pydantic.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from recsys_moe.config import ArchName

DAG_ID = "retrain_ranking"
SETTINGS_PREFIX = "RECSYS_MOE_RETRAIN_"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: Any) -> Any:
    """`90`, `"90"`, `"90s"`, `"30m"`, `"6h"`, `"1d"` → a timedelta; anything else (a timedelta, an
    ISO 8601 duration such as `"PT6H"`) is left to pydantic."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value.lower())
        if match:
            return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]


class Record(BaseModel):
    """A step's input or output; it travels between Airflow tasks as a JSON dict (an XCom)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # a metric may be NaN

    def to_xcom(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SyntheticFeed(Record):
    """The synthetic source's settings: it emits the days a run needs that are not there yet."""

    emit: bool = Field(True, description="emit missing days (demo, CI); false when events land from upstream")
    n_users: int = Field(5_000, ge=1)
    n_items: int = Field(2_000, ge=1)
    impressions_per_day: int = Field(30_000, ge=1)
    seed: int = 0


class RetrainParams(Record):
    """What a run can be told (the DAG's params: the trigger form, `airflow dags trigger -c`)."""

    spec: str = Field(
        "synthetic",
        description="feature spec: a bundled name or a YAML path (its dataset source must be the "
        "day-partitioned event log)",
    )
    window_days: int = Field(
        7,
        ge=3,
        description="days of events ending on the run's day: training days, then the spec's validation and test days",
    )
    arch: ArchName = Field("mmoe", description="model architecture (model.arch)")
    margin: float = Field(0.0, ge=0, description="mean holdout improvement over the champion needed to promote")
    tolerance: float = Field(0.002, ge=0, description="largest regression allowed on any metric")
    beat_baselines_by: float | None = Field(
        None,
        description="also require the day's training run to beat the baselines fitted in it by this much "
        "on every gated metric (its test split); null: not required",
    )
    model_name: str = Field("recsys-ranker", description="registered model name")
    experiment: str = Field("recsys-moe/retrain", description="MLflow experiment of the training runs")
    run_config: str | None = Field(None, description="run config YAML (e.g. configs/mmoe.yaml)")
    overrides: list[str] = Field(default_factory=list, description='run config overrides, e.g. ["train.epochs=3"]')
    home: str | None = Field(None, description="data and output root; default $RECSYS_MOE_HOME or ~/recsys-moe")
    source_dir: str | None = Field(
        None,
        description="event log (impressions/day=YYYY-MM-DD/, users.parquet, items.parquet); default "
        "<home>/events/<spec>",
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking + registry URI; default $MLFLOW_TRACKING_URI or sqlite:///<home>/mlruns.db"
    )
    synthetic: SyntheticFeed = Field(default_factory=SyntheticFeed, description=SyntheticFeed.__doc__)


class DagSettings(BaseModel):
    """What the DAG needs at parse time, before any run exists: its schedule, its retry policy,
    how long its sensors wait for the event log, how long each task may run, and the defaults of
    its params (what a scheduled run, which has no conf, uses).

    Read from the environment (`from_env`: ``RECSYS_MOE_RETRAIN_<FIELD>``, e.g.
    ``RECSYS_MOE_RETRAIN_TRAIN_TIMEOUT=8h``), not from Airflow Variables: a top-level
    `Variable.get` is a metadata-DB round trip at every parse of the file (the DAG processor
    re-parses it every 30 s by default), which Airflow's best practices warn against, and the
    scheduler, the DAG processor and the workers each parse the file, so they must all see the same
    values: the deployment's environment, like its ``AIRFLOW__*`` variables, gives that. A misspelt
    or invalid value is a DAG import error that names it, not a silent default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: str | None = Field(
        "@daily", description="cron expression or preset; `none` for manual and backfill runs only"
    )
    retries: int = Field(2, ge=0, description="retries of every task (not the sensors' waiting: that is a timeout)")
    retry_delay: Duration = Field(timedelta(minutes=2), description="first retry delay, doubled on each retry")
    max_retry_delay: Duration = Field(timedelta(minutes=30), description="longest retry delay")
    poke_interval: Duration = Field(timedelta(minutes=5), description="how often a sensor checks the event log")
    wait_timeout: Duration = Field(
        timedelta(hours=6), description="how long a sensor waits for its day partitions before the run fails"
    )
    train_timeout: Duration = Field(timedelta(hours=6), description="execution_timeout of `train`")
    step_timeout: Duration = Field(
        timedelta(hours=1),
        description="execution_timeout of emit_events, build_features, evaluate, register, score_next_period",
    )
    light_timeout: Duration = Field(
        timedelta(minutes=10),
        description="execution_timeout of the branch, promote/keep, publish_summary and each sensor poke",
    )
    params: RetrainParams = Field(
        default_factory=RetrainParams,
        description="the params' defaults, as JSON: those it names override RetrainParams' own "
        '(e.g. {"source_dir": "/data/events", "synthetic": {"emit": false}})',
    )

    @field_validator("params", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("schedule", mode="before")
    @classmethod
    def _no_schedule(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none", "null") else value

    @field_validator("train_timeout", "step_timeout", "light_timeout", "poke_interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0 s")
        return value

    @field_validator("wait_timeout", "retry_delay", "max_retry_delay")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Each field's environment variable."""
        return {name: SETTINGS_PREFIX + name.upper() for name in cls.model_fields}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DagSettings:
        """The settings the environment sets, defaults for the rest. An unknown
        ``RECSYS_MOE_RETRAIN_*`` variable is an error (a typo would otherwise be ignored)."""
        environ = os.environ if environ is None else environ
        names = cls.env_names()
        unknown = sorted(k for k in environ if k.startswith(SETTINGS_PREFIX) and k not in names.values())
        if unknown:
            raise ValueError(f"unknown DAG settings {unknown}; known: {sorted(names.values())}")
        return cls.model_validate({name: environ[env] for name, env in names.items() if env in environ})


class RetrainRun(Record):
    """A run of one day: its params, and where everything it reads and writes lives."""

    params: RetrainParams
    dag_id: str
    day: date  # the last complete day of events (see `interval_day`)
    window: tuple[date, date]  # first and last day of events the model learns and is tested on
    home: Path
    source_dir: Path
    tracking_uri: str

    @property
    def run_dir(self) -> Path:
        return self.home / "retrain" / self.dag_id / self.day.isoformat()

    @property
    def features_dir(self) -> Path:
        return self.run_dir / "features"

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def scores_dir(self) -> Path:
        return self.run_dir / "scores"

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    def outputs(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in ("features_dir", "model_dir", "scores_dir", "summary_path")}


def interval_day(
    data_interval_start: datetime | None,
    data_interval_end: datetime | None,
    run_after: datetime | None = None,
    logical_date: datetime | None = None,
) -> date:
    """The day of events a run works on: the last complete day before the run's moment.

    That moment is the end of the run's data interval when it has a real one of its own: a
    ``CronDataIntervalTimetable`` run for [Jan 8, Jan 9) (logical date Jan 8) gives Jan 8.
    Otherwise it is the logical date: a ``@daily`` trigger (``CronTriggerTimetable``, an empty
    interval at Jan 9 00:00) gives Jan 8, and so does ``airflow dags trigger --logical-date
    2026-01-09``, whose data interval Airflow 3 infers from the trigger's wall-clock time, not from
    the logical date. A run with no logical date (a manual run in Airflow 3) uses `run_after`: at
    Jan 9 13:00 it gives Jan 8, as Jan 9 is not over yet.
    """
    if (
        data_interval_start is not None
        and data_interval_end is not None
        and data_interval_start < data_interval_end
        and (logical_date is None or logical_date == data_interval_start)  # the interval is the run's own
    ):
        return (data_interval_end - timedelta(microseconds=1)).date()
    moment = logical_date or data_interval_end or run_after
    if moment is None:
        raise ValueError("a run needs a logical date, a data interval or a run_after date")
    return moment.date() - timedelta(days=1)


def home(explicit: str | None = None) -> Path:
    """Root of the DAG's data and outputs: the `home` param, else $RECSYS_MOE_HOME, else ~/recsys-moe."""
    return Path(explicit or os.environ.get("RECSYS_MOE_HOME") or Path.home() / "recsys-moe").expanduser().resolve()


def resolve_run(params: dict[str, Any] | RetrainParams | None, dag_id: str, day: date) -> RetrainRun:
    """The params (unset ones from their defaults; a misspelt one is an error that names it)
    plus every path of this day's run."""
    if not isinstance(params, RetrainParams):
        params = RetrainParams.model_validate({k: v for k, v in (params or {}).items() if v is not None})
    root = home(params.home)
    spec_name = Path(params.spec).stem
    source = Path(params.source_dir).expanduser().resolve() if params.source_dir else root / "events" / spec_name
    return RetrainRun(
        params=params,
        dag_id=dag_id,
        day=day,
        window=(day - timedelta(days=params.window_days - 1), day),
        home=root,
        source_dir=source,
        tracking_uri=params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlruns.db'}",
    )


def airflow_params(defaults: RetrainParams | None = None) -> dict[str, dict[str, Any]]:
    """Each param as the keyword arguments of an Airflow `Param`: its default (from `defaults`, the
    deployment's `DagSettings.params`, else `RetrainParams`' own) and its JSON schema (type,
    bounds, choices, description), read off `RetrainParams`."""
    defaults = defaults or RetrainParams()
    schema = RetrainParams.model_json_schema()
    out = {}
    for name, field in RetrainParams.model_fields.items():
        prop = {k: v for k, v in schema["properties"][name].items() if k not in ("title", "default")}
        if "anyOf" in prop:  # `str | None` → {"type": ["string", "null"]}, which Airflow's form renders
            prop["type"] = [option["type"] for option in prop.pop("anyOf")]
        if "$ref" in prop:  # a nested model: an object in the form
            prop = {"type": "object", "description": field.description}
        default = getattr(defaults, name)
        out[name] = {"default": default.to_xcom() if isinstance(default, Record) else default, **prop}
    return out
