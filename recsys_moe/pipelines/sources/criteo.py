"""Deterministic Criteo-like click logs: 26 power-law categoricals, 13 dense counts, a history.

Why: the Criteo display-advertising data is the standard shape for large embedding tables
(a few categorical columns with ~10M distinct ids, the rest from a handful to ~1M), but it
cannot be downloaded here. This source produces data of the same shape at any row count,
vectorized (numpy + polars + pyarrow), with memory O(n_rows) whatever the cardinalities:

* ``C1..C26``: string ids. Each column draws ranks from a bounded power law
  ``P(rank r) ~ r^-zipf_exponent`` over ``1..cardinality`` by an analytic (continuous)
  inverse CDF, then maps ranks to ids with a per-column affine bijection mod the
  cardinality, so the most frequent id is not id 0 and ids look scattered;
* ``I1..I13``: non-negative integer counts (log-normal, rounded), each column with its own
  null rate;
* ``history``: a list of recent ids from the ``history_column`` id space (variable length,
  ``0..history_max_length``), correlated with the row's own id in that column;
* ``ts``: sorted timestamps over ``n_days`` from ``start_date``;
* ``click``: Bernoulli of a hidden logistic model over a few categoricals (per-id weights from a
  stateless integer hash, so no 10M-entry table is ever built), two dense columns and whether
  the row's id appears in its history; the intercept is calibrated for ``target_ctr``.

Layout on disk (see :func:`write`): ``out_dir/events/day=YYYY-MM-DD/part-0.parquet``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from recsys_moe.pipelines.sources.calibration import sigmoid, solve_intercept
from recsys_moe.pipelines.sources.events import time_splits
from recsys_moe.pipelines.sources.partitions import remove_other_days, write_day_partitions

__all__ = [
    "CATEGORICAL_COLUMNS",
    "DEFAULT_CARDINALITIES",
    "CriteoConfig",
    "dense_columns",
    "generate",
    "read",
    "sample_power_law",
    "splits",
    "write",
]

N_CATEGORICAL = 26
CATEGORICAL_COLUMNS = tuple(f"C{i}" for i in range(1, N_CATEGORICAL + 1))

# Criteo-Kaggle-like spread, with the three largest tables at 10M rows.
DEFAULT_CARDINALITIES: tuple[int, ...] = (
    1_460,
    583,
    10_000_000,
    1_000_000,
    305,
    24,
    12_517,
    633,
    3,
    93_145,
    5_683,
    10_000_000,
    3_194,
    27,
    14_992,
    500_000,
    10,
    5_652,
    2_173,
    4,
    10_000_000,
    18,
    15,
    286_181,
    105,
    142_572,
)

_US_PER_DAY = 86_400 * 1_000_000
_EPOCH = datetime.date(1970, 1, 1)
_CALIBRATION_SAMPLE = 50_000
# Columns whose ids drive clicks (with per-id weight scale), and the two dense drivers.
_CLICK_COLUMNS = {"C1": 0.8, "C2": 0.6, "C5": 0.5, "C6": 0.7, "C9": 0.4, "C14": 0.5, "C20": 0.6, "C3": 0.3}
_CLICK_DENSE = {"I1": 0.35, "I5": -0.25}


def dense_columns(n_dense: int = 13) -> tuple[str, ...]:
    return tuple(f"I{i}" for i in range(1, n_dense + 1))


@dataclass(frozen=True)
class CriteoConfig:
    n_rows: int = 100_000
    n_days: int = 7
    seed: int = 0
    cardinalities: tuple[int, ...] = field(default=DEFAULT_CARDINALITIES)
    zipf_exponent: float = 1.1
    n_dense: int = 13
    history_max_length: int = 20
    history_column: str = "C1"
    target_ctr: float = 0.12
    start_date: datetime.date = datetime.date(2026, 1, 1)

    def __post_init__(self) -> None:
        for name in ("n_rows", "n_days", "n_dense", "history_max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        cards = tuple(self.cardinalities)
        if len(cards) != N_CATEGORICAL or any(isinstance(c, bool) or int(c) < 1 for c in cards):
            raise ValueError(f"cardinalities must be {N_CATEGORICAL} positive ints, got {cards!r}")
        object.__setattr__(self, "cardinalities", tuple(int(c) for c in cards))
        if not self.zipf_exponent > 0:
            raise ValueError(f"zipf_exponent must be > 0, got {self.zipf_exponent!r}")
        if not 0 < self.target_ctr < 1:
            raise ValueError(f"target_ctr must be in (0, 1), got {self.target_ctr!r}")
        if self.history_column not in CATEGORICAL_COLUMNS:
            raise ValueError(f"history_column must be one of C1..C{N_CATEGORICAL}, got {self.history_column!r}")
        if not isinstance(self.start_date, datetime.date) or isinstance(self.start_date, datetime.datetime):
            raise ValueError(f"start_date must be a datetime.date, got {self.start_date!r}")

    def cardinality(self, column: str) -> int:
        return self.cardinalities[CATEGORICAL_COLUMNS.index(column)]


def sample_power_law(rng: np.random.Generator, cardinality: int, size: int, exponent: float) -> np.ndarray:
    """0-based ranks in ``[0, cardinality)`` with ``P(rank r) ~ (r + 1) ** -exponent`` (approximately).

    Inverse CDF of the continuous density ``x^-a`` on ``[1, cardinality + 1)``, floored: O(size)
    time and memory for any cardinality (no probability vector).
    """
    u = rng.random(size)
    top = float(cardinality) + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(u * np.log(top))
    else:
        one_minus = 1.0 - exponent
        x = (1.0 + u * (top**one_minus - 1.0)) ** (1.0 / one_minus)
    ranks = np.floor(x).astype(np.int64) - 1
    np.clip(ranks, 0, cardinality - 1, out=ranks)
    return ranks


def _mix(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 finalizer of (x + salt): a stateless uint64 hash, vectorized."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(salt & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _rank_to_id(ranks: np.ndarray, cardinality: int, salt: int) -> np.ndarray:
    """A bijection of [0, cardinality) (affine mod n with a multiplier coprime to n)."""
    if cardinality == 1:
        return np.zeros_like(ranks)
    mult = int(_mix(np.array([cardinality]), salt)[0] % np.uint64(cardinality)) | 1
    while np.gcd(mult, cardinality) != 1:
        mult += 2
    shift = int(_mix(np.array([cardinality]), salt + 1)[0] % np.uint64(cardinality))
    # (mult * rank) may overflow int64 for 10M x 10M: use python-int-free modular arithmetic in uint64.
    r = ranks.astype(np.uint64)
    n = np.uint64(cardinality)
    return ((np.uint64(mult % cardinality) * r) % n + np.uint64(shift)) % n


def _id_weight(ids: np.ndarray, salt: int) -> np.ndarray:
    """A standard-normal-ish weight per id, stable for the id (sum of 4 uniforms, rescaled)."""
    h = _mix(ids, salt)
    parts = [((h >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.float64) / 65535.0 for k in range(4)]
    return (sum(parts) - 2.0) * np.sqrt(3.0)


def _draw(cfg: CriteoConfig, n: int, streams: list[np.random.SeedSequence]) -> dict[str, np.ndarray]:
    """Raw numeric draws for n rows: categorical ids (uint64), dense floats (nan = null), history."""
    out: dict[str, np.ndarray] = {}
    for j, col in enumerate(CATEGORICAL_COLUMNS):
        rng = np.random.default_rng(streams[j])
        card = cfg.cardinalities[j]
        out[col] = _rank_to_id(sample_power_law(rng, card, n, cfg.zipf_exponent), card, cfg.seed * 1000 + j)
    # Per-column shape parameters come from the seed alone: calibration and data share them.
    rng_world = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2]))
    mus = rng_world.uniform(0.0, 4.0, cfg.n_dense)
    sigmas = rng_world.uniform(0.5, 1.5, cfg.n_dense)
    null_rates = rng_world.uniform(0.0, 0.4, cfg.n_dense)
    rng_dense = np.random.default_rng(streams[N_CATEGORICAL])
    for k, col in enumerate(dense_columns(cfg.n_dense)):
        v = np.floor(rng_dense.lognormal(mus[k], sigmas[k], n))
        v[rng_dense.random(n) < null_rates[k]] = np.nan
        out[col] = v
    # History: the row's own id (with prob 0.3 when non-empty) plus power-law ids of that space.
    rng_hist = np.random.default_rng(streams[N_CATEGORICAL + 1])
    card = cfg.cardinality(cfg.history_column)
    salt = cfg.seed * 1000 + CATEGORICAL_COLUMNS.index(cfg.history_column)
    lengths = rng_hist.integers(0, cfg.history_max_length + 1, n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = _rank_to_id(sample_power_law(rng_hist, card, int(offsets[-1]), cfg.zipf_exponent), card, salt)
    has_own = (lengths > 0) & (rng_hist.random(n) < 0.3)
    flat[offsets[:-1][has_own]] = out[cfg.history_column][has_own]
    out["_history_offsets"] = offsets
    out["_history_values"] = flat
    out["_history_own"] = has_own
    return out


def _click_logits(cfg: CriteoConfig, d: dict[str, np.ndarray]) -> np.ndarray:
    logit = np.zeros(len(d["C1"]), dtype=np.float64)
    for col, scale in _CLICK_COLUMNS.items():
        logit += scale * _id_weight(d[col], cfg.seed * 7919 + CATEGORICAL_COLUMNS.index(col))
    for col, w in _CLICK_DENSE.items():
        if col in d:
            v = np.log1p(np.nan_to_num(d[col], nan=0.0))
            logit += w * (v - 2.0)
    logit += 1.2 * d["_history_own"]
    return logit


def generate(config: CriteoConfig) -> pl.DataFrame:
    """All rows, sorted by ``ts``; identical output for identical configs."""
    cfg = config
    n_streams = N_CATEGORICAL + 4
    streams = np.random.SeedSequence(cfg.seed).spawn(n_streams)
    cal = np.random.SeedSequence([cfg.seed, 1]).spawn(n_streams)
    base = solve_intercept(_click_logits(cfg, _draw(cfg, _CALIBRATION_SAMPLE, cal)), cfg.target_ctr)

    n = cfg.n_rows
    d = _draw(cfg, n, streams)
    rng_label = np.random.default_rng(streams[N_CATEGORICAL + 2])
    click = (rng_label.random(n) < sigmoid(base + _click_logits(cfg, d))).astype(np.int8)
    rng_time = np.random.default_rng(streams[N_CATEGORICAL + 3])
    ts = np.sort(rng_time.integers(0, cfg.n_days * _US_PER_DAY, n, dtype=np.int64))
    ts += (cfg.start_date - _EPOCH).days * _US_PER_DAY

    columns: dict[str, pl.Series] = {
        "event_id": pl.Series("event_id", np.arange(n, dtype=np.int64)),
        "ts": pl.Series("ts", ts).cast(pl.Datetime("us")),
        "click": pl.Series("click", click),
    }
    for col in dense_columns(cfg.n_dense):
        columns[col] = pl.Series(col, d[col]).fill_nan(None).cast(pl.Int64)
    for col in CATEGORICAL_COLUMNS:
        columns[col] = pl.Series(col, d[col].astype(np.int64)).cast(pl.Utf8)
    values = pa.array(d["_history_values"].astype(np.int64)).cast(pa.string())
    history = pa.LargeListArray.from_arrays(pa.array(d["_history_offsets"]), values)
    columns["history"] = pl.Series("history", pl.from_arrow(history)).cast(pl.List(pl.Utf8))
    return pl.DataFrame(columns)


def write(frame: pl.DataFrame, out_dir: Path) -> Path:
    """Hive day partitions ``out_dir/events/day=YYYY-MM-DD/part-0.parquet``, each written atomically.

    Stale ``day=`` partitions from an earlier write are removed. Returns the events directory.
    """
    events = Path(out_dir) / "events"
    remove_other_days(events, write_day_partitions(frame, events, "event_id"))
    return events


def read(raw_dir: Path) -> pl.LazyFrame:
    """Lazily scan a directory written by :func:`write`, sorted by ``ts`` (ties by ``event_id``)."""
    frame = pl.scan_parquet(Path(raw_dir) / "events", hive_partitioning=True, hive_schema={"day": pl.Date})
    return frame.drop("day").sort("ts", "event_id")


def splits(raw_dir: Path, valid_days: int = 1, test_days: int = 1) -> dict[str, pl.LazyFrame]:
    """Train / valid / test by time: the last ``test_days`` are test, the ``valid_days`` before valid."""
    return time_splits(read(raw_dir), f"{raw_dir}", valid_days, test_days)
