"""A dataset build as a file: which spec, which raw data, where the dataset goes, the limits.

The files in the checkout's top-level `pipelines/` folder are such definitions; `recsys-moe
pipeline --config pipelines/census_group1.yaml` runs one, and any flag (`--data`, `--out`, ...)
overrides the file. Relative paths are relative to where the command runs, as on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from recsys_moe.config import origin_of, read_yaml, validated


class PipelineDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: str = Field(description="feature spec: a bundled name (`recsys-moe specs`) or a YAML path")
    data: Path = Field(description="raw data directory for the spec's dataset source")
    out: Path = Field(description="dataset directory to (re)build")
    rows_per_shard: int = Field(1_000_000, ge=1)
    max_reject_rate: float = Field(0.05, ge=0, le=1, description="fail when more rows than this are rejected")
    history_dir: Path | None = Field(
        None, description="specs with history features: where their day partitions live (default <out>.history)"
    )
    rebuild_history: bool = Field(False, description="recompute every day's history features")


def load_definition(path: str | Path | None, overrides: dict[str, Any]) -> PipelineDefinition:
    """The definition in `path` (if any) with `overrides` (the flags given) on top."""
    raw = read_yaml(path) if path is not None else {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    origin = origin_of(path, overrides, "recsys-moe pipeline")
    return validated(PipelineDefinition, raw, origin, "pipeline definition (--config FILE, or --spec, --data, --out)")
