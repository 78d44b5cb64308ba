"""Deterministic synthetic recommendation event logs: users, items, impressions.

Why: the demo, the tests and the benchmarks need realistic, *learnable* data at any
scale (thousands to tens of millions of rows) without network access or shipped
files. Everything is vectorized numpy + polars; a given :class:`SyntheticConfig`
always yields identical frames.

Generative model (hidden from the output tables):

* users and items carry latent factors; an item's latent is its category's latent
  plus noise, a user's latent is a demographic (age bucket, gender) component plus
  noise, so the latents leak into observable features;
* user interests are 1-5 categories sampled without replacement by user/category
  affinity (Gumbel top-k);
* item popularity is Zipf-like, user activity lognormal;
* ``P(click) = sigmoid(base + affinity + interest boost + country x category bias
  + position + device + item quality/freshness + drift(t))``; ``P(conversion | click)``
  uses a different mix of the latents, price (cheaper converts more), brand quality, age
  and device; ``dwell_seconds`` of a click is lognormal driven by affinity;
* ``drift(t)`` is slow temporal dynamics, the part of the signal that static user/item
  features and ID embeddings cannot learn but recent click rates can: each item's appeal
  and each user's interest in each category swing on their own slow cycles (periods of
  weeks, random phases), so an item's or a user x category pair's click rate of the last
  days says more about tomorrow than its all-time rate. Cycles are functions of absolute
  time, so :func:`generate_day` calls for consecutive days continue the same curves;
  ``item_drift`` / ``interest_drift`` scale them (0 switches them off);
* a conversion happens a lognormal delay (median 3 h) after its impression, truncated to
  ``attribution_days``: ``conversion_ts``, null when there is no conversion;
* ``base`` terms are calibrated on a fixed calibration sample so overall CTR is
  about 9 % and CVR given click about 15 % for any config.

Random streams: world, users, items, calibration, time, impressions, dynamics and
conversion delays each have their own child stream, so the drift parameters and the
delays never shift the draws behind the other columns: with both drift scales at 0 every
column but ``conversion_ts`` is what it was before drift and delays existed.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_moe import atomic
from recsys_moe.pipelines.contract import EventContract
from recsys_moe.pipelines.sources.calibration import sigmoid, solve_intercept
from recsys_moe.pipelines.sources.partitions import remove_other_days, write_day_partitions

__all__ = [
    "IMPRESSIONS_SCHEMA",
    "ITEMS_SCHEMA",
    "USERS_SCHEMA",
    "SyntheticConfig",
    "SyntheticTables",
    "generate",
    "generate_day",
    "impressions_contract",
    "read",
    "write",
    "write_partitions",
]

USERS_SCHEMA = pl.Schema(
    {
        "user_id": pl.Int64(),
        "age": pl.Int32(),
        "gender": pl.Utf8(),
        "country": pl.Utf8(),
        "interests": pl.List(pl.Utf8),
        "signup_days": pl.Int32(),
    }
)
ITEMS_SCHEMA = pl.Schema(
    {
        "item_id": pl.Int64(),
        "category": pl.Utf8(),
        "brand": pl.Utf8(),
        "price": pl.Float64(),
        "item_age_days": pl.Int32(),
    }
)
IMPRESSIONS_SCHEMA = pl.Schema(
    {
        "impression_id": pl.Int64(),
        "ts": pl.Datetime("us"),
        "user_id": pl.Int64(),
        "item_id": pl.Int64(),
        "position": pl.Int32(),
        "device": pl.Utf8(),
        "click": pl.Int8(),
        "conversion": pl.Int8(),
        "conversion_ts": pl.Datetime("us"),  # null unless conversion == 1
        "dwell_seconds": pl.Float64(),
    }
)


GENDERS = ("f", "m", "u")
DEVICES = ("ios", "android", "web")
N_COUNTRIES = 20
MAX_INTERESTS = 5
MAX_POSITION = 20
TARGET_CTR = 0.09
TARGET_CVR = 0.15

# Fixed (config independent) so chunking never changes the random streams.
_CHUNK = 1_000_000
_CALIBRATION_SAMPLE = 100_000
_US_PER_HOUR = 3_600 * 1_000_000
_US_PER_DAY = 24 * _US_PER_HOUR
_EPOCH = datetime.date(1970, 1, 1)
_AGE_EDGES = np.array([25, 35, 45, 55, 65])  # -> 6 age buckets
# Slow dynamics: cycle periods in days (uniform in these ranges), amplitudes in logits
# (uniform, before the config's drift scales), phases uniform.
_ITEM_PERIOD_DAYS = (10.0, 60.0)
_ITEM_AMPLITUDE = (0.3, 1.2)
_INTEREST_PERIOD_DAYS = (7.0, 40.0)
_INTEREST_AMPLITUDE = (0.5, 1.5)
_PHASE_LEVELS = 256  # user x category phases are stored as uint8 (1M users x 30 cats = 30 MB)
# Conversion delay after the impression: lognormal, median 3 h.
_DELAY_MEDIAN_US = 3 * _US_PER_HOUR
_DELAY_SIGMA = 1.3

_POSITIVE_INT_FIELDS = (
    "n_users",
    "n_items",
    "n_impressions",
    "n_days",
    "n_categories",
    "n_brands",
    "latent_dim",
    "attribution_days",
)
_NONNEGATIVE_FLOAT_FIELDS = ("item_drift", "interest_drift")


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and seed of a synthetic dataset; validated eagerly so bad configs fail fast."""

    n_users: int = 5_000
    n_items: int = 2_000
    n_impressions: int = 200_000
    n_days: int = 14
    n_categories: int = 30
    n_brands: int = 300
    latent_dim: int = 8
    seed: int = 0
    start_date: datetime.date = datetime.date(2026, 1, 1)
    attribution_days: int = 7  # a conversion happens at most this long after its impression
    item_drift: float = 1.0  # scale of the items' appeal cycles (0: static items)
    interest_drift: float = 1.0  # scale of the users' per-category interest cycles (0: static)

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        for name in _NONNEGATIVE_FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")
        # datetime is a date subclass; a time component would silently shift partitions.
        if not isinstance(self.start_date, datetime.date) or isinstance(self.start_date, datetime.datetime):
            raise ValueError(f"start_date must be a datetime.date, got {self.start_date!r}")


@dataclass
class SyntheticTables:
    """The three raw tables, eager, in the exact schemas above."""

    users: pl.DataFrame
    items: pl.DataFrame
    impressions: pl.DataFrame


@dataclass
class _World:
    """Hidden generative parameters shared by users, items and impressions."""

    # users
    user_latent: np.ndarray  # (n_users, d) float32
    user_country: np.ndarray  # (n_users,) int
    user_interest_mask: np.ndarray  # (n_users, n_categories) bool
    user_conv_bias: np.ndarray  # (n_users,) float32
    user_device: np.ndarray  # (n_users,) int8, preferred device
    user_cdf: np.ndarray  # activity CDF for sampling
    # items
    item_latent: np.ndarray  # (n_items, d) float32
    item_conv_latent: np.ndarray  # (n_items, d) float32, mixed latent for conversion
    item_category: np.ndarray  # (n_items,) int
    item_click_bias: np.ndarray  # (n_items,) float32
    item_conv_bias: np.ndarray  # (n_items,) float32
    item_cdf: np.ndarray  # popularity CDF for sampling
    # global
    country_category_bias: np.ndarray  # (N_COUNTRIES, n_categories) float32
    dynamics: _Dynamics | None  # None: no drift at all (both scales 0)


@dataclass
class _Dynamics:
    """Slow cycles of click appeal: ``amp * sin(freq * t + phase)``, t in days since 1970."""

    item_amp: np.ndarray  # (n_items,) float64, logits
    item_freq: np.ndarray  # (n_items,) float64, radians per day
    item_phase: np.ndarray  # (n_items,) float64, radians
    user_amp: np.ndarray  # (n_users,) float64, logits
    user_freq: np.ndarray  # (n_users,) float64, radians per day
    user_cat_phase: np.ndarray  # (n_users, n_categories) uint8, in 1/_PHASE_LEVELS turns

    def click_drift(self, uid: np.ndarray, iid: np.ndarray, cat: np.ndarray, t_days: np.ndarray) -> np.ndarray:
        item = self.item_amp[iid] * np.sin(self.item_freq[iid] * t_days + self.item_phase[iid])
        phase = self.user_cat_phase[uid, cat] * (2.0 * np.pi / _PHASE_LEVELS)
        interest = self.user_amp[uid] * np.sin(self.user_freq[uid] * t_days + phase)
        return item + interest


def _make_dynamics(cfg: SyntheticConfig, rng: np.random.Generator) -> _Dynamics | None:
    """Per-item and per-user x category cycles, drawn from their own stream (always, so the
    stream's use does not depend on the scales)."""

    def freq(period: tuple[float, float], n: int) -> np.ndarray:
        return 2.0 * np.pi / rng.uniform(*period, n)

    dyn = _Dynamics(
        item_amp=cfg.item_drift * rng.uniform(*_ITEM_AMPLITUDE, cfg.n_items),
        item_freq=freq(_ITEM_PERIOD_DAYS, cfg.n_items),
        item_phase=rng.uniform(0.0, 2.0 * np.pi, cfg.n_items),
        user_amp=cfg.interest_drift * rng.uniform(*_INTEREST_AMPLITUDE, cfg.n_users),
        user_freq=freq(_INTEREST_PERIOD_DAYS, cfg.n_users),
        user_cat_phase=rng.integers(0, _PHASE_LEVELS, (cfg.n_users, cfg.n_categories), dtype=np.uint8),
    )
    return dyn if cfg.item_drift > 0 or cfg.interest_drift > 0 else None


def _names(prefix: str, n: int, min_width: int) -> pl.Series:
    width = max(min_width, len(str(n - 1)))
    return pl.Series([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=pl.Utf8)


def _zipf_probs(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    return c / c[-1]


def _sample_cdf(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    """Inverse-CDF sampling of iid indices.

    Sorted uniforms make searchsorted cache-friendly (~4x faster on 1M-entry CDFs);
    shuffling the result afterwards restores an iid sequence.
    """
    idx = np.searchsorted(cdf, np.sort(rng.random(size)), side="right")
    np.minimum(idx, len(cdf) - 1, out=idx)
    rng.shuffle(idx)
    return idx.astype(np.int64, copy=False)


def _make_users(
    cfg: SyntheticConfig, rng: np.random.Generator, cat_latent: np.ndarray
) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    n, d, n_cat = cfg.n_users, cfg.latent_dim, cfg.n_categories

    age = np.clip(np.rint(rng.normal(38.0, 13.0, n)), 18, 80).astype(np.int32)
    gender = rng.choice(len(GENDERS), size=n, p=[0.48, 0.47, 0.05]).astype(np.int8)
    country = rng.choice(N_COUNTRIES, size=n, p=_zipf_probs(N_COUNTRIES, 1.1))
    signup_days = np.floor(rng.exponential(400.0, n)).astype(np.int32)

    # Latent = demographic part + idiosyncratic part, so age/gender carry signal.
    age_lat = rng.normal(0.0, 1.0, (len(_AGE_EDGES) + 1, d))
    gender_lat = rng.normal(0.0, 1.0, (len(GENDERS), d))
    demo = (age_lat[np.digitize(age, _AGE_EDGES)] + gender_lat[gender]) / np.sqrt(2.0)
    latent = (0.6 * demo + 0.8 * rng.normal(0.0, 1.0, (n, d))).astype(np.float32)

    # Interests: Gumbel top-k over user/category affinity = sampling without replacement.
    k_max = min(MAX_INTERESTS, n_cat)
    k_probs = np.array([0.25, 0.30, 0.20, 0.15, 0.10][:k_max])
    k = rng.choice(k_max, size=n, p=k_probs / k_probs.sum()) + 1
    top = np.empty((n, k_max), dtype=np.int64)
    cat_latent_32 = cat_latent.astype(np.float32)
    for s in range(0, n, 200_000):  # bounded memory for the (users x categories) scores
        e = min(n, s + 200_000)
        # log(Exp) - score == -(score + Gumbel): ascending argsort is the Gumbel top-k, but
        # float32 exponentials are ~5x cheaper to draw than rng.gumbel.
        affinity = (latent[s:e] @ cat_latent_32.T) * np.float32(2.0 / np.sqrt(d))
        expo = rng.standard_exponential((e - s, n_cat), dtype=np.float32)
        keys = np.log(np.maximum(expo, np.finfo(np.float32).tiny)) - affinity
        top[s:e] = np.argsort(keys, axis=1)[:, :k_max]
    valid = np.arange(k_max)[None, :] < k[:, None]
    interest_mask = np.zeros((n, n_cat), dtype=bool)
    rows = np.broadcast_to(np.arange(n)[:, None], top.shape)
    interest_mask[rows[valid], top[valid]] = True

    # Fixed-width name matrix -> Array -> List, cut to each user's k: no per-user Python work.
    top_names = _names("cat_", n_cat, 2).gather(top.ravel()).reshape((n, k_max))
    interests = (
        pl.DataFrame({"top": top_names, "k": k}).select(pl.col("top").arr.to_list().list.head(pl.col("k"))).to_series()
    )

    users = pl.DataFrame(
        {
            "user_id": np.arange(n, dtype=np.int64),
            "age": age,
            "gender": pl.Series(GENDERS, dtype=pl.Utf8).gather(gender),
            "country": _names("c", N_COUNTRIES, 2).gather(country),
            "interests": interests,
            "signup_days": signup_days,
        },
        schema=USERS_SCHEMA,
    )
    hidden = {
        "latent": latent,
        "country": country,
        "interest_mask": interest_mask,
        "conv_bias": (0.015 * (age - 40.0)).astype(np.float32),
        "device": rng.choice(len(DEVICES), size=n, p=[0.4, 0.45, 0.15]).astype(np.int8),
        "cdf": _cdf(rng.lognormal(0.0, 1.2, n)),
    }
    return users, hidden


def _make_items(
    cfg: SyntheticConfig, rng: np.random.Generator, cat_latent: np.ndarray
) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    n, d, n_cat, n_brand = cfg.n_items, cfg.latent_dim, cfg.n_categories, cfg.n_brands

    category = rng.choice(n_cat, size=n, p=_zipf_probs(n_cat, 0.7))
    # Brands belong to categories (brand b -> category b % n_cat); fall back to any brand.
    n_in_cat = np.maximum(0, (n_brand - np.arange(n_cat) + n_cat - 1) // n_cat)[category]
    own = category + n_cat * np.floor(rng.random(n) * np.maximum(n_in_cat, 1)).astype(np.int64)
    brand = np.where(n_in_cat > 0, own, rng.integers(0, n_brand, n))

    cat_price = rng.normal(3.2, 0.8, n_cat)
    brand_premium = rng.normal(0.0, 0.3, n_brand)
    log_price = cat_price[category] + brand_premium[brand] + rng.normal(0.0, 0.5, n)
    price = np.round(np.exp(log_price), 2).clip(min=0.01)
    item_age = np.floor(rng.exponential(150.0, n)).astype(np.int32)

    latent = (0.8 * cat_latent[category] + 0.6 * rng.normal(0.0, 1.0, (n, d))).astype(np.float32)
    mix = 0.5 * np.eye(d) + 0.85 * rng.normal(0.0, 1.0, (d, d)) / np.sqrt(d)
    conv_latent = (latent @ mix.T).astype(np.float32)

    popularity = _zipf_probs(n, 1.05)[rng.permutation(n)]
    log_pop = np.log(popularity)
    quality = 0.25 * (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9)
    click_bias = quality + rng.normal(0.0, 0.25, n) - 0.1 * np.log1p(item_age / 30.0)
    z_price = (np.log(price) - np.log(price).mean()) / (np.log(price).std() + 1e-9)
    brand_quality = rng.normal(0.0, 0.4, n_brand)
    conv_bias = -0.7 * z_price + brand_quality[brand]

    items = pl.DataFrame(
        {
            "item_id": np.arange(n, dtype=np.int64),
            "category": _names("cat_", n_cat, 2).gather(category),
            "brand": _names("brand_", n_brand, 3).gather(brand),
            "price": price,
            "item_age_days": item_age,
        },
        schema=ITEMS_SCHEMA,
    )
    hidden = {
        "latent": latent,
        "conv_latent": conv_latent,
        "category": category,
        "click_bias": click_bias.astype(np.float32),
        "conv_bias": conv_bias.astype(np.float32),
        "cdf": _cdf(popularity),
    }
    return items, hidden


_POSITION_PROBS = np.exp(-0.08 * np.arange(MAX_POSITION))
_POSITION_PROBS /= _POSITION_PROBS.sum()
_POSITION_EFFECT = (-0.6 * np.log(np.arange(1, MAX_POSITION + 1))).astype(np.float32)
_DEVICE_CLICK = np.array([0.15, 0.0, -0.25], dtype=np.float32)  # ios, android, web
_DEVICE_CONV = np.array([0.1, 0.0, 0.3], dtype=np.float32)
_HOUR_WEIGHTS = np.array([0.3 + np.exp(-((h - 20) ** 2) / 18) + 0.6 * np.exp(-((h - 12) ** 2) / 8) for h in range(24)])
_HOUR_WEIGHTS /= _HOUR_WEIGHTS.sum()


def _draw_context(
    w: _World, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Who saw what, where and on which device (independent of time, so ts can be pre-sorted)."""
    uid = _sample_cdf(rng, w.user_cdf, size)
    iid = _sample_cdf(rng, w.item_cdf, size)
    pos = rng.choice(MAX_POSITION, size=size, p=_POSITION_PROBS).astype(np.int32) + 1
    other = rng.integers(0, len(DEVICES), size).astype(np.int8)
    device = np.where(rng.random(size) < 0.8, w.user_device[uid], other)
    return uid, iid, pos, device


def _logits(
    w: _World, uid: np.ndarray, iid: np.ndarray, pos: np.ndarray, device: np.ndarray, t_days: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Click / conversion logits without intercepts at times `t_days` (days since 1970),
    plus affinity and interest flag."""
    u = w.user_latent[uid]
    scale = np.float32(1.0 / np.sqrt(u.shape[1]))
    affinity = np.einsum("ij,ij->i", u, w.item_latent[iid]) * scale
    conv_affinity = np.einsum("ij,ij->i", u, w.item_conv_latent[iid]) * scale
    cat = w.item_category[iid]
    interest = w.user_interest_mask[uid, cat]
    click = (
        0.9 * affinity
        + 1.0 * interest
        + w.country_category_bias[w.user_country[uid], cat]
        + _POSITION_EFFECT[pos - 1]
        + _DEVICE_CLICK[device]
        + w.item_click_bias[iid]
    )
    if w.dynamics is not None:  # skipped when off, so the static model is reproduced exactly
        click = click + w.dynamics.click_drift(uid, iid, cat, t_days)
    conv = 0.7 * conv_affinity + 0.5 * interest + w.item_conv_bias[iid] + w.user_conv_bias[uid] + _DEVICE_CONV[device]
    return click, conv, affinity, interest


def _make_timestamps(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Sorted epoch microseconds in [start_date, start_date + n_days) with a diurnal profile."""
    n = cfg.n_impressions
    start_us = (cfg.start_date - _EPOCH).days * _US_PER_DAY
    ts = rng.integers(0, cfg.n_days, n, dtype=np.int64) * _US_PER_DAY
    ts += rng.choice(24, size=n, p=_HOUR_WEIGHTS).astype(np.int64) * _US_PER_HOUR
    ts += rng.integers(0, _US_PER_HOUR, n, dtype=np.int64)
    ts.sort()
    ts += start_us
    return ts


def _conversion_delays(rng: np.random.Generator, size: int, max_us: int) -> np.ndarray:
    """Lognormal delays in whole microseconds, truncated to [1, max_us] by redrawing the
    too-long ones (clipping would pile them up at exactly max_us)."""
    mu = np.log(_DELAY_MEDIAN_US)
    delay = rng.lognormal(mu, _DELAY_SIGMA, size)
    for _ in range(100):  # each round keeps at most P(delay > max_us) of the rest
        over = np.flatnonzero(delay > max_us)
        if not len(over):
            break
        delay[over] = rng.lognormal(mu, _DELAY_SIGMA, len(over))
    return np.clip(np.rint(delay), 1, max_us).astype(np.int64)


def _days(ts_us: np.ndarray) -> np.ndarray:
    return ts_us / _US_PER_DAY  # float64 days since 1970: the clock of the slow dynamics


def generate(config: SyntheticConfig, *, events_key: int | None = None) -> SyntheticTables:
    """Build users, items and ts-sorted impressions; identical output for identical configs.

    Independent child streams (world, users, items, calibration, time, impressions,
    dynamics, conversion delays) keep tables stable when unrelated sizes change, e.g. more
    impressions keep the same users. `events_key` draws the time, impression and delay
    streams from (seed, events_key) instead, so different keys give different events in the
    same world (see :func:`generate_day`).
    """
    cfg = config
    # spawn(n) children are prefix-stable: the first six are those of the pre-dynamics code.
    streams = np.random.SeedSequence(cfg.seed).spawn(8)
    if events_key is not None:
        streams[4], streams[5], streams[7] = np.random.SeedSequence([cfg.seed, int(events_key)]).spawn(3)
    rng_world, rng_users, rng_items, rng_cal, rng_time, rng_imp, rng_dyn, rng_delay = (
        np.random.default_rng(s) for s in streams
    )

    cat_latent = rng_world.normal(0.0, 1.0, (cfg.n_categories, cfg.latent_dim))
    cc_bias = rng_world.normal(0.0, 0.4, (N_COUNTRIES, cfg.n_categories)).astype(np.float32)
    users, uh = _make_users(cfg, rng_users, cat_latent)
    items, ih = _make_items(cfg, rng_items, cat_latent)
    world = _World(
        user_latent=uh["latent"],
        user_country=uh["country"],
        user_interest_mask=uh["interest_mask"],
        user_conv_bias=uh["conv_bias"],
        user_device=uh["device"],
        user_cdf=uh["cdf"],
        item_latent=ih["latent"],
        item_conv_latent=ih["conv_latent"],
        item_category=ih["category"],
        item_click_bias=ih["click_bias"],
        item_conv_bias=ih["conv_bias"],
        item_cdf=ih["cdf"],
        country_category_bias=cc_bias,
        dynamics=_make_dynamics(cfg, rng_dyn),
    )

    # Calibrate intercepts on a fixed-size sample so rates do not depend on n_impressions;
    # its times are uniform over the config's days, so the drift averages as in the log.
    cal_context = _draw_context(world, rng_cal, _CALIBRATION_SAMPLE)
    start_day = (cfg.start_date - _EPOCH).days
    cal_days = start_day + cfg.n_days * rng_cal.random(_CALIBRATION_SAMPLE)
    cal_click, cal_conv, _, _ = _logits(world, *cal_context, cal_days)
    base_click = solve_intercept(cal_click.astype(np.float64), TARGET_CTR)
    p_cal = sigmoid(base_click + cal_click.astype(np.float64))
    base_conv = solve_intercept(cal_conv.astype(np.float64), TARGET_CVR, weights=p_cal)

    ts = _make_timestamps(cfg, rng_time)
    n = cfg.n_impressions
    uid = np.empty(n, dtype=np.int64)
    iid = np.empty(n, dtype=np.int64)
    pos = np.empty(n, dtype=np.int32)
    device = np.empty(n, dtype=np.int8)
    click = np.empty(n, dtype=np.int8)
    conv = np.empty(n, dtype=np.int8)
    dwell = np.empty(n, dtype=np.float64)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        m = e - s
        c_uid, c_iid, c_pos, c_dev = _draw_context(world, rng_imp, m)
        l_click, l_conv, aff, interest = _logits(world, c_uid, c_iid, c_pos, c_dev, _days(ts[s:e]))
        c_click = rng_imp.random(m) < sigmoid(base_click + l_click)
        c_conv = c_click & (rng_imp.random(m) < sigmoid(base_conv + l_conv))
        log_dwell = 3.0 + 0.35 * aff + 0.2 * interest + 0.4 * c_conv + rng_imp.normal(0.0, 0.6, m)
        uid[s:e], iid[s:e], pos[s:e], device[s:e] = c_uid, c_iid, c_pos, c_dev
        click[s:e], conv[s:e] = c_click, c_conv
        dwell[s:e] = np.where(c_click, np.exp(log_dwell), 0.0)

    # Delays for the converted rows only, in row order, from their own stream.
    converted = np.flatnonzero(conv)
    conversion_ts = np.zeros(n, dtype=np.int64)
    conversion_ts[converted] = ts[converted] + _conversion_delays(
        rng_delay, len(converted), cfg.attribution_days * _US_PER_DAY
    )

    impressions = pl.DataFrame(
        {
            "impression_id": np.arange(n, dtype=np.int64),
            "ts": pl.Series(ts).cast(pl.Datetime("us")),
            "user_id": uid,
            "item_id": iid,
            "position": pos,
            "device": pl.Series(DEVICES, dtype=pl.Utf8).gather(device),
            "click": click,
            "conversion": conv,
            "conversion_ts": pl.Series(conversion_ts).cast(pl.Datetime("us")),
            "dwell_seconds": dwell,
        },
        schema=IMPRESSIONS_SCHEMA,
    ).with_columns(pl.when(pl.col("conversion") == 1).then(pl.col("conversion_ts")).alias("conversion_ts"))
    return SyntheticTables(users=users, items=items, impressions=impressions)


# impression_id of a day's events = day number since 1970 * this + row: unique across days.
DAY_ID_STRIDE = 1_000_000_000


def generate_day(config: SyntheticConfig, day: datetime.date) -> SyntheticTables:
    """The events of one day in `config`'s world, for logs that grow a day at a time.

    Users and items are those of ``generate(config)`` (same seed and sizes); the impressions
    (``config.n_impressions`` of them, all on `day`; ``start_date`` and ``n_days`` are ignored)
    come from streams keyed by (seed, day), so each day differs and every call for the same day
    returns the same rows. Impression ids are ``day number * DAY_ID_STRIDE + row``, unique
    across days.
    """
    if not isinstance(day, datetime.date) or isinstance(day, datetime.datetime):
        raise ValueError(f"day must be a datetime.date, got {day!r}")
    if config.n_impressions >= DAY_ID_STRIDE:
        raise ValueError(f"n_impressions per day must be below {DAY_ID_STRIDE:,}")
    number = (day - _EPOCH).days
    one_day = dataclasses.replace(config, start_date=day, n_days=1)
    tables = generate(one_day, events_key=number)
    ids = pl.col("impression_id") + number * DAY_ID_STRIDE
    tables.impressions = tables.impressions.with_columns(ids)
    return tables


def write(tables: SyntheticTables, out_dir: Path) -> dict[str, Path]:
    """Write users/items parquet and hive day-partitioned impressions; returns the paths written.

    Layout: ``out_dir/users.parquet``, ``out_dir/items.parquet``,
    ``out_dir/impressions/day=YYYY-MM-DD/part-0.parquet`` (one partition per day with
    events; the ``day`` key lives only in the path). Stale ``day=`` partitions from an
    earlier write are removed so a re-write never mixes datasets.
    """
    out_dir = Path(out_dir)
    imp_dir = out_dir / "impressions"
    paths = {
        "users": out_dir / "users.parquet",
        "items": out_dir / "items.parquet",
        "impressions": imp_dir,
    }
    remove_other_days(imp_dir, _write_tables(tables, out_dir))
    return paths


def _write_tables(tables: SyntheticTables, out_dir: Path) -> set[str]:
    """users, items and one impressions partition per day with events → the partition names."""
    imp_dir = out_dir / "impressions"
    atomic.write_parquet(tables.users, out_dir / "users.parquet")
    atomic.write_parquet(tables.items, out_dir / "items.parquet")

    return write_day_partitions(tables.impressions, imp_dir, "impression_id")


def write_partitions(tables: SyntheticTables, out_dir: Path) -> list[Path]:
    """Add (or replace) the day partitions of `tables` in a log written by :func:`write`.

    Unlike :func:`write`, partitions of other days are left alone, so a log can grow one day at
    a time (``write_partitions(generate_day(config, day), out_dir)``). Users and items are
    rewritten atomically (identical content for the same config). Returns the partitions written.
    """
    out_dir = Path(out_dir)
    return [out_dir / "impressions" / part for part in sorted(_write_tables(tables, out_dir))]


def read(
    raw_dir: Path, with_day: bool = False, day: datetime.date | None = None
) -> tuple[pl.LazyFrame, pl.LazyFrame, pl.LazyFrame]:
    """Lazily scan a directory produced by :func:`write`: (users, items, impressions).

    Impressions come back in the generated schema and sorted by ``ts`` (ties by
    ``impression_id``); the hive ``day`` key is dropped unless `with_day` (the event contract
    checks that each event lies on its partition's day). `day`: only that day's partition.
    """
    raw_dir = Path(raw_dir)
    users = pl.scan_parquet(raw_dir / "users.parquet")
    items = pl.scan_parquet(raw_dir / "items.parquet")
    scan = pl.scan_parquet(raw_dir / "impressions", hive_partitioning=True, hive_schema={"day": pl.Date})
    if day is not None:
        scan = scan.filter(pl.col("day") == day)  # the other partitions are never opened
    impressions = (
        scan.select(*IMPRESSIONS_SCHEMA.names(), *(["day"] if with_day else [])).sort(
            "ts", "impression_id", maintain_order=True
        )  # exact duplicates keep the files' order
    )
    return users, items, impressions


def impressions_contract(attribution_days: int = 7) -> EventContract:
    """The rules a log of impressions (as :func:`write` lays it out) satisfies; see
    :mod:`pipelines.contract`. `attribution_days` is the config's."""
    return EventContract(
        event_id="impression_id",
        time="ts",
        required=("impression_id", "ts", "user_id", "item_id", "position", "device", "dwell_seconds"),
        flags=("click", "conversion"),
        requires=(("conversion", "click"),),
        delayed=(("conversion", "conversion_ts", attribution_days),),
        types={"user_id": "int", "item_id": "int", "position": "int", "device": "string", "dwell_seconds": "float"},
    )
