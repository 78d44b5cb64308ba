"""Settings of the online scoring endpoint: where the model comes from and the request limits.

One validated object, so a typo or a contradictory setting (two model sources, none) fails when
the server starts, not on the first request.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recsys_moe.scoring import RankingConfig
from recsys_moe.threads import available_cpus, fixed_threads

TOKEN_ENV = "RECSYS_MOE_TOKEN"
MiB = 1024 * 1024
# Scoring is CPU work: past a few workers or threads per core they only contend. The caps stop a
# typo (100000 workers would start a thread per queued request; 100000 torch threads, a pool that size).
MAX_SCORING_WORKERS = 64
MAX_TORCH_THREADS = 256


def _token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


class ModelUri(BaseModel):
    """A parsed `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME` (= `@champion`)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelUri:
        if not uri.startswith("models:/") or not uri.removeprefix("models:/").strip("/@"):
            raise ValueError(f"model_uri: {uri!r} is not models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME")
        rest = uri.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return cls(name=name, alias=alias)
        if "/" in rest:
            name, version = rest.split("/", 1)
            return cls(name=name, version=version)
        return cls(name=rest, alias="champion")


class ServingSettings(BaseModel):
    """Everything `create_app` and `run` need. Exactly one of `model_dir` and `model_uri`."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Path | None = Field(None, description="a model bundle directory (what training writes to best/)")
    model_uri: str | None = Field(
        None, description="a registered model: models:/NAME@champion follows the alias, models:/NAME/3 pins a version"
    )
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI (default: the project's store)")
    model_name: str | None = Field(None, description="name reported for a model_dir (default: the directory's name)")
    poll_seconds: float = Field(30.0, ge=0, description="how often to check the alias for a new version; 0: never")
    wait_for_model: bool = Field(
        False, description="with model_uri: start even if the alias does not exist yet (503 until it does)"
    )
    max_rows: int = Field(1000, ge=1, description="most rows (score) or candidates (rank) per request")
    max_body_bytes: int = Field(4 * MiB, ge=1024, description="largest request body accepted")
    token: str | None = Field(
        default_factory=_token_from_env, repr=False, description=f"bearer token for /v1/*; default: ${TOKEN_ENV}"
    )
    ranking: RankingConfig = Field(default_factory=RankingConfig, description="default ranking of /v1/rank")
    torch_threads: int = Field(
        default_factory=lambda: fixed_threads() or 1,
        ge=1,
        le=MAX_TORCH_THREADS,
        validate_default=True,  # $RECSYS_MOE_THREADS is held to the same bounds
        description=f"intra-op threads per inference (at most {MAX_TORCH_THREADS}); default $RECSYS_MOE_THREADS, else 1",
    )
    scoring_workers: int = Field(
        default_factory=lambda: min(MAX_SCORING_WORKERS, max(1, available_cpus() // 2)),
        ge=1,
        le=MAX_SCORING_WORKERS,
        description=f"requests scored at once (at most {MAX_SCORING_WORKERS}); more wait their turn. Default: half the cores this "
        "process may use (at least 1): requests scored in parallel beyond that only contend for the cores and the "
        "GIL. One scores in the event loop's thread (fastest; probes wait for the requests already read), more in "
        "worker threads",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    access_log: bool = Field(False, description="one uvicorn log line per request (costs latency at high rates)")
    request_timeout: float = Field(
        30.0, gt=0, description="seconds a client has to send a whole request; then the connection is closed"
    )
    keep_alive: int = Field(5, ge=1, description="seconds an idle keep-alive connection is kept open")

    @model_validator(mode="after")
    def _one_source(self) -> ServingSettings:
        if (self.model_dir is None) == (self.model_uri is None):
            raise ValueError("set exactly one of model_dir (a bundle directory) and model_uri (models:/NAME@ALIAS)")
        if self.model_uri is not None:
            ModelUri.parse(self.model_uri)
        if self.wait_for_model and self.model_uri is None:
            raise ValueError("wait_for_model: only valid with model_uri (a directory is either there or not)")
        return self

    @property
    def source(self) -> ModelUri | None:
        return ModelUri.parse(self.model_uri) if self.model_uri is not None else None
