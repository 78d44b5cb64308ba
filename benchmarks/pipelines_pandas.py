"""Point-in-time history features in plain pandas: the baseline and the oracle.

    python benchmarks/pipelines_pandas.py --rows 200000

`pandas_history` computes the features of a `features/history.py::HistorySpec` (counts, smoothed
rates, recent-item sequences, hour / weekday) the way a data scientist would write them with
pandas idioms: cumulative counts per entity key looked up with `merge_asof(allow_exact_matches=
False)`, and a groupby-apply for the sequences. It exists for two reasons:

1. it is the pandas baseline that benchmarks/results/pipelines.md compares the Polars
   implementation (`pipelines/history.py`) with, and
2. it is the tests' correctness oracle for that implementation: written independently and
   plainly, straight from the semantics (strictly before t, windows [t - w days, t), delayed
   streams counted at their own time, ties in time broken by the larger event id first).

`main()` times it on a random event log and prints rows/s and the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_moe.features.history import HistorySpec, Stream

ROOT = Path(__file__).resolve().parents[1]


def default_history_spec() -> HistorySpec:
    """The history section of the bundled `synthetic_history` spec (the benchmark's)."""
    from recsys_moe.features import load_spec

    history = load_spec("synthetic_history").history
    assert history is not None
    return history


def _stream_mask(df: pd.DataFrame, stream: Stream, time_col: str) -> tuple[pd.Series, pd.Series]:
    """Which rows yield a stream event, and the event times: flag == 1 (all rows if no flag), time not null."""
    times = df[stream.time or time_col]
    mask = times.notna() if stream.flag is None else (df[stream.flag] == 1) & times.notna()
    return mask, times


def _before(key: pd.Series, q: pd.Series, cum: pd.DataFrame) -> np.ndarray:
    """Per row: its key's events with time < q, from the cumulative counts `cum` (key, t, n), sorted by t."""
    found = pd.merge_asof(pd.DataFrame({"key": key, "t": q}), cum, on="t", by="key", allow_exact_matches=False)
    return found["n"].fillna(0).to_numpy("int64")


def _sequence(
    df: pd.DataFrame,
    key: pd.Series,
    mask: pd.Series,
    times: pd.Series,
    value: str,
    event_id: str,
    horizon: pd.Timedelta,
    max_length: int,
    t: pd.Series,
) -> pd.Series:
    """Per row: the values of its key's stream events in [t - horizon, t), most recent first."""
    ev = pd.DataFrame({"key": key[mask], "t": times[mask], "id": df.loc[mask, event_id], "v": df.loc[mask, value]})
    ev = ev.sort_values(["key", "t", "id"])  # oldest first; reversed below, so ties: larger id first
    by_key = {k: (g["t"].to_numpy(), g["v"].to_numpy()) for k, g in ev.groupby("key", sort=False)}
    empty = (np.array([], dtype=ev["t"].dtype), np.array([], dtype="int64"))

    def per_key(rows: pd.Series) -> pd.Series:
        ts, vals = by_key.get(rows.name, empty)
        hi = np.searchsorted(ts, rows.to_numpy(), side="left")  # events strictly before t
        lo = np.maximum(np.searchsorted(ts, (rows - horizon).to_numpy(), side="left"), hi - max_length)
        return pd.Series([vals[a:b][::-1].tolist() for a, b in zip(lo, hi)], index=rows.index, dtype=object)

    return t.groupby(key, sort=False, group_keys=False).apply(per_key).sort_index()


def pandas_history(events: pd.DataFrame, spec: HistorySpec) -> pd.DataFrame:
    """events (columns per spec.raw_columns(); ts and conversion_ts as datetime64[us]) →
    the same rows sorted by (time, event_id), with the event_id column and every column of spec.columns()."""
    df = events.sort_values([spec.time, spec.event_id], kind="stable").reset_index(drop=True)
    t = df[spec.time]
    out: dict[str, pd.Series | np.ndarray] = {spec.event_id: df[spec.event_id]}
    keys: dict[str, pd.Series] = {}
    for entity, cols in spec.entities.items():
        # One integer per entity key; a null is a key like any other (dropna=False).
        key = keys[entity] = df.groupby(cols, dropna=False, sort=False).ngroup().astype("int64")
        for name, stream in spec.streams.items():
            mask, times = _stream_mask(df, stream, spec.time)
            # Events of the key at or before each distinct event time, sorted by time for merge_asof.
            cum = (
                pd.DataFrame({"key": key[mask], "t": times[mask]})
                .groupby(["key", "t"])
                .size()
                .groupby(level="key")
                .cumsum()
                .rename("n")
                .reset_index()
                .sort_values("t", kind="stable")
            )
            now = _before(key, t, cum)
            for w in spec.windows_days:  # [t - w, t) = (before t) - (before t - w)
                out[f"{entity}_{name}_{w}d"] = now - _before(key, t - pd.Timedelta(days=w), cum)
    for entity in spec.entities:
        for name, rate in spec.rates.items():
            for w in spec.windows_days:
                num, den = out[f"{entity}_{rate.numerator}_{w}d"], out[f"{entity}_{rate.denominator}_{w}d"]
                out[f"{entity}_{name}_{w}d"] = (num + rate.strength * rate.prior) / (den + rate.strength)
    for seq in spec.sequences:
        mask, times = _stream_mask(df, spec.streams[seq.stream], spec.time)
        horizon = pd.Timedelta(days=max(spec.windows_days))
        out[seq.name] = _sequence(
            df, keys[seq.entity], mask, times, seq.value, spec.event_id, horizon, seq.max_length, t
        )
    if spec.time_features:
        out["event_hour"] = t.dt.hour.astype("int8")
        out["event_dow"] = (t.dt.day_of_week + 1).astype("int8")  # ISO: Monday = 1 ... Sunday = 7
    return pd.DataFrame(out)[[spec.event_id, *spec.columns()]]


def random_events(rows: int, seed: int = 0, days: int = 60) -> pd.DataFrame:
    """A random impression log: ~100 impressions per user, 50 per item, conversions only on clicks."""
    rng = np.random.default_rng(seed)
    users, items = max(20, rows // 100), max(30, rows // 50)
    ts = np.datetime64("2024-01-01", "us") + rng.integers(0, days * 86_400, rows).astype("timedelta64[s]")
    item = rng.integers(0, items, rows)
    click = (rng.random(rows) < 0.08).astype("int64")
    conversion = click * (rng.random(rows) < 0.15)
    delay = rng.integers(0, 7 * 86_400_000_000, rows).astype("timedelta64[us]")
    return pd.DataFrame(
        {
            "impression_id": np.arange(rows, dtype="int64"),
            "ts": ts,
            "user_id": rng.integers(0, users, rows),
            "item_id": item,
            "category": item % 20,
            "click": click,
            "conversion": conversion,
            "conversion_ts": np.where(conversion == 1, ts + delay, np.datetime64("NaT", "us")),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs; the best is reported (the first is cold)")
    args = parser.parse_args()
    events, spec = random_events(args.rows, args.seed), default_history_spec()
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = pandas_history(events, spec)
        seconds.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        f"pandas_history: {len(result):,} rows, {result.shape[1] - 1} features, runs "
        f"{', '.join(f'{s:.2f}' for s in seconds)} s; best {len(result) / min(seconds):,.0f} rows/s, "
        f"peak RSS {peak_mib:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
