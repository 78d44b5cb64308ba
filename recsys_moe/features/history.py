"""Point-in-time history features, declared in a spec's `history:` section.

Most of a ranking model's signal comes from what an entity did *before* the event being scored:
a user's click-through rate over the last week, an item's conversions yesterday, the items the
user clicked last. Each such feature is computed strictly from events earlier than the row's
timestamp (`pipelines/history.py`), so training sees exactly what serving would have seen.

    history:
      time: ts                          # the event time of a row
      entities: {user: [user_id], item: [item_id], user_category: [user_id, category]}
      streams:                          # what is counted, and when it happened
        impressions: {}
        clicks: {flag: click}
        conversions: {flag: conversion, time: conversion_ts, requires: clicks}  # counted when it converted
      windows_days: [1, 7, 30]
      rates:
        ctr: {numerator: clicks, denominator: impressions, prior: 0.08, strength: 20}
      sequences:
        - {name: recent_clicks, entity: user, value: item_id, stream: clicks, max_length: 20, embedding_dim: 16}
      time_features: true
      attribution_days: 7               # a conversion happens at most this long after its event

Every entity x stream x window becomes a count column `<entity>_<stream>_<w>d`, every entity x
rate x window a smoothed rate `<entity>_<rate>_<w>d` = (num + strength * prior) / (den + strength),
every sequence a multi-hot column (most recent first), and `time_features` the event's hour and
day of week. They are added to the spec's features (counts log1p-scaled, rates standardized,
sequences hashed into `buckets`), so the rest of the pipeline and the model treat them like any
other feature.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Stream(_Strict):
    """Events that count: rows whose `flag` column is 1 (every row if no flag), at `time`."""

    flag: str | None = None
    time: str | None = Field(None, description="column with the time the event happened; default: the row's time")
    requires: str | None = Field(None, description="a stream whose flag must be set too (a conversion needs a click)")


class Rate(_Strict):
    numerator: str
    denominator: str
    prior: float = Field(ge=0, le=1)
    strength: float = Field(10.0, gt=0, description="pseudo-events of the prior added to both counts")


class Sequence(_Strict):
    name: str
    entity: str
    value: str = Field(description="column whose values form the list, e.g. item_id")
    stream: str
    max_length: int = Field(20, ge=1)
    embedding_dim: int = Field(16, ge=1)
    buckets: int = Field(262_144, ge=1, description="hash buckets of the sequence's embedding table")
    pooling: str = "mean"


class HistorySpec(_Strict):
    time: str = "ts"
    event_id: str = Field("event_id", description="unique event key; orders events that share a timestamp")
    entities: dict[str, list[str]] = Field(min_length=1)
    streams: dict[str, Stream] = Field(min_length=1)
    windows_days: list[int] = Field(default_factory=lambda: [1, 7, 30], min_length=1)
    rates: dict[str, Rate] = Field(default_factory=dict)
    sequences: list[Sequence] = Field(default_factory=list)
    time_features: bool = True
    attribution_days: int = Field(0, ge=0, description="longest delay from an event to its delayed stream events")

    @model_validator(mode="after")
    def _check(self) -> HistorySpec:
        for name, rate in self.rates.items():
            for side in (rate.numerator, rate.denominator):
                if side not in self.streams:
                    raise ValueError(f"rates.{name}: {side!r} is not a stream ({sorted(self.streams)})")
        for name, stream in self.streams.items():
            parent = self.streams.get(stream.requires) if stream.requires else None
            if stream.requires and (parent is None or parent.flag is None or stream.flag is None):
                raise ValueError(f"streams.{name}.requires: {stream.requires!r} must be another flagged stream")
        for i, seq in enumerate(self.sequences):
            if seq.entity not in self.entities:
                raise ValueError(f"sequences[{i}].entity: {seq.entity!r} is not an entity ({sorted(self.entities)})")
            if seq.stream not in self.streams:
                raise ValueError(f"sequences[{i}].stream: {seq.stream!r} is not a stream ({sorted(self.streams)})")
        if any(w < 1 for w in self.windows_days):
            raise ValueError("windows_days: every window is at least one day")
        for name, cols in self.entities.items():
            if not cols:
                raise ValueError(f"entities.{name}: name at least one column")
        return self

    @property
    def lookback_days(self) -> int:
        """Days of events before day D that day D's features can depend on: the longest window
        (or the sequences' window), plus the attribution delay of delayed streams."""
        return max(self.windows_days) + self.attribution_days

    @staticmethod
    def column(entity: str, what: str, days: int) -> str:
        """The name of a count (`what` = a stream) or rate column: `<entity>_<what>_<days>d`."""
        return f"{entity}_{what}_{days}d"

    def count_columns(self) -> list[str]:
        return [self.column(e, s, w) for e in self.entities for s in self.streams for w in self.windows_days]

    def rate_columns(self) -> list[str]:
        return [self.column(e, r, w) for e in self.entities for r in self.rates for w in self.windows_days]

    def columns(self) -> list[str]:
        """Every column the history step adds, in order."""
        time = ["event_hour", "event_dow"] if self.time_features else []
        return [*self.count_columns(), *self.rate_columns(), *(s.name for s in self.sequences), *time]

    def raw_columns(self) -> list[str]:
        """The event-log columns the history step reads."""
        cols = [self.event_id, self.time, *(c for cols in self.entities.values() for c in cols)]
        for s in self.streams.values():
            cols += [c for c in (s.flag, s.time) if c is not None]
        cols += [s.value for s in self.sequences]
        return list(dict.fromkeys(cols))

    def features(self) -> list[dict[str, Any]]:
        """The spec features these columns become (raw dicts, validated with the spec's own)."""
        out: list[dict[str, Any]] = [
            {"name": c, "kind": "dense", "transform": "log1p", "min": 0} for c in self.count_columns()
        ]
        out += [
            {"name": c, "kind": "dense", "transform": "standardize", "min": 0, "max": 1} for c in self.rate_columns()
        ]
        out += [
            {
                "name": s.name,
                "kind": "multi_hot",
                "embedding_dim": s.embedding_dim,
                "pooling": s.pooling,
                "max_length": s.max_length,
                "vocab": {"kind": "hash", "buckets": s.buckets},
            }
            for s in self.sequences
        ]
        if self.time_features:
            out += [
                {"name": "event_hour", "kind": "categorical", "embedding_dim": 4},
                {"name": "event_dow", "kind": "categorical", "embedding_dim": 4},
            ]
        return out
