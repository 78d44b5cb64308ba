"""One day's retraining run as a typed object: the params it was given and every path it reads and
writes. The DAG resolves it in each task (`resolve_run`) and the steps (`retrain.steps`) take it.

Light on purpose: the DAG file imports this module at parse time, for its id and its params
(`airflow_params`), so it imports nothing heavier than pydantic.
"""

from __future__ import annotations

import os
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from recsys_moe.config import ArchName

DAG_ID = "retrain_ranking"


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
    data_interval_start: datetime | None, data_interval_end: datetime | None, run_after: datetime | None = None
) -> date:
    """The day of events a run works on: the last complete day before its data interval ends.

    A daily ``CronDataIntervalTimetable`` run for [Jan 8, Jan 9) and a ``@daily`` trigger
    (``CronTriggerTimetable``, an empty interval at Jan 9 00:00) both give Jan 8; a manual run
    at Jan 9 13:00 also gives Jan 8 (Jan 9 is not over yet). Runs without a data interval (an
    Airflow 3 manual run with no logical date) use `run_after`.
    """
    end = data_interval_end or run_after
    if end is None:
        raise ValueError("a run needs a data interval or a run_after date")
    if data_interval_start is not None and data_interval_start < end:
        return (end - timedelta(microseconds=1)).date()
    return end.date() - timedelta(days=1)


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


def airflow_params() -> dict[str, dict[str, Any]]:
    """Each param as the keyword arguments of an Airflow `Param`: its default and its JSON schema
    (type, bounds, choices, description), read off `RetrainParams`."""
    schema = RetrainParams.model_json_schema()
    out = {}
    for name, field in RetrainParams.model_fields.items():
        prop = {k: v for k, v in schema["properties"][name].items() if k not in ("title", "default")}
        if "anyOf" in prop:  # `str | None` → {"type": ["string", "null"]}, which Airflow's form renders
            prop["type"] = [option["type"] for option in prop.pop("anyOf")]
        if "$ref" in prop:  # a nested model: an object in the form
            prop = {"type": "object", "description": field.description}
        default = field.get_default(call_default_factory=True)
        out[name] = {"default": default.to_xcom() if isinstance(default, Record) else default, **prop}
    return out
