"""Serving speed: batch scoring rows/s, and the online endpoint against `mlflow models serve`.

    make bench-serving        # or: python benchmarks/serving_speed.py [--seconds 10]

1. Batch scoring: a census-size MMoE (8 experts [64, 32], the census benchmark's model; trained
   briefly here, speed does not depend on quality) scores the census test rows repeated to
   ~500k rows through `serving.batch.score_parquet` (parquet in → parquet out). Falls back to
   the synthetic data set when `../shared/data/census-income` is absent.
2. Online: a synthetic feed model (user context + item candidates) is logged to a temporary
   MLflow store and served two ways on loopback, one worker process each:
   `recsys-moe serve` (`POST /v1/rank`, one context + 100 candidates) and `mlflow models serve`
   of the same logged model (`POST /invocations` with the same 100 rows, context merged in, as
   MLflow's pyfunc has no notion of a shared context). An open-loop load generator (asyncio +
   aiohttp, requests scheduled at a fixed rate; latency counted from the scheduled time, so a
   slow server cannot hide queueing) runs each rate for `--seconds`; then a closed loop with 8
   concurrent clients measures the peak throughput. The load generator shares the 2 cores.

Writes benchmarks/results/serving.md and serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys_moe.config import load_config
from recsys_moe.features import load_spec
from recsys_moe.pipelines.build import build
from recsys_moe.pipelines.sources import synthetic
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.scoring import Scorer
from recsys_moe.scoring.batch import score_parquet
from recsys_moe.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "serving"
CENSUS = ROOT.parent / "shared" / "data" / "census-income"
MODEL = ["model.arch=mmoe", "model.num_experts=8", "model.expert_hidden=[64,32]", "model.tower_hidden=[16]"]
USER_COLUMNS = ["user_id", "country", "gender", "age", "interests", "signup_days"]
CANDIDATES = 100
RATES = (50, 100, 200)


def _train(manifest: Any, workdir: Path, steps: int) -> Path:
    config = load_config(
        None,
        [
            *MODEL,
            "train.epochs=1",
            f"train.max_steps_per_epoch={steps}",
            f"train.checkpoint_dir={workdir}",
            "tracking.enabled=false",
        ],
    )
    return train(manifest, config, progress=False).model_dir


def bench_batch(target_rows: int) -> dict[str, Any]:
    if CENSUS.exists():
        name, manifest = "census_group1", build(load_spec("census_group1"), CENSUS, CACHE / "census", progress=False)
    else:
        raw = CACHE / "raw"
        synthetic.write(synthetic.generate(synthetic.SyntheticConfig(n_impressions=200_000)), raw)
        name, manifest = "synthetic", build(load_spec("synthetic"), raw, CACHE / "synthetic", progress=False)
    bundle = _train(manifest, CACHE / f"run-{name}", steps=50)
    test = read_holdout(manifest.raw_path("test"))
    copies = max(1, -(-target_rows // test.height))
    source = CACHE / f"batch-{name}.parquet"
    pl.concat([test] * copies).write_parquet(source, row_group_size=65_536)
    scorer = Scorer(bundle)
    score_parquet(scorer, source, CACHE / "warmup.parquet", progress=False)  # warm caches, page in
    runs = [score_parquet(scorer, source, CACHE / "scores.parquet", progress=False) for _ in range(3)]
    best = min(runs, key=lambda r: r.seconds)
    return {
        "data": name,
        "rows": best.rows_in,
        "seconds": best.seconds,
        "rows_per_s": best.rows_per_s,
        "all_rows_per_s": [r.rows_per_s for r in runs],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


async def _open_loop(url: str, body: dict, rate: float, seconds: float) -> dict[str, float]:
    import aiohttp

    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        start = time.perf_counter() + 0.1

        async def one(i: int) -> None:
            nonlocal errors
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            try:
                async with session.post(url, data=payload, headers=headers) as r:
                    await r.read()
                    errors += r.status != 200
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - scheduled)

        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {
        "rate": rate,
        "requests": n,
        "errors": errors,
        "achieved_rps": n / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


async def _closed_loop(url: str, body: dict, clients: int, seconds: float) -> dict[str, float]:
    import aiohttp

    done = errors = 0
    latencies: list[float] = []
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as session:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                async with session.post(url, data=payload, headers=headers) as r:
                    await r.read()
                    errors += r.status != 200
                latencies.append(time.perf_counter() - t)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": done,
        "errors": errors,
        "rps": done / elapsed,
        "p50_ms": float(np.percentile(np.array(latencies) * 1e3, 50)),
    }


def bench_online(seconds: float) -> dict[str, Any]:
    from recsys_moe.registry.package import log_model
    from recsys_moe.tracking.tracker import MlflowTracker

    raw = CACHE / "raw-online"
    synthetic.write(synthetic.generate(synthetic.SyntheticConfig(n_impressions=100_000)), raw)
    manifest = build(load_spec("synthetic"), raw, CACHE / "synthetic-online", progress=False)
    store_dir = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    uri = f"sqlite:///{store_dir / 'mlruns.db'}"
    config = load_config(
        None, ["train.epochs=1", "train.max_steps_per_epoch=30", f"train.checkpoint_dir={CACHE / 'run-online'}"]
    )
    tracker = MlflowTracker("serving-bench", uri=uri)
    result = train(manifest, config, tracker=tracker, progress=False)
    tracker.close()
    holdout = read_holdout(manifest.raw_path("test"))
    model_uri = log_model(result.model_dir, result.run_id, holdout.head(5), tracking_uri=uri)

    scorer = Scorer(result.model_dir)
    rows = holdout.select(scorer.input_columns).head(CANDIDATES).to_dicts()
    context = {k: rows[0][k] for k in USER_COLUMNS}
    candidates = [{k: v for k, v in r.items() if k not in USER_COLUMNS} for r in rows]
    merged = [{**context, **c} for c in candidates]
    ours_body = {"context": context, "candidates": candidates}
    mlflow_body = {"dataframe_records": merged}

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "RECSYS_MOE_CACHE": str(store_dir / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # mlflow runs `uvicorn`
    out: dict[str, Any] = {"candidates": CANDIDATES, "seconds_per_rate": seconds}
    servers = {
        "recsys-moe": (
            [
                sys.executable,
                "-m",
                "recsys_moe.cli",
                "serve",
                "--model",
                str(result.model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
            ],
            "/readyz",
            "/v1/rank",
            ours_body,
        ),
        "mlflow": (
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
                "--workers",
                "1",
            ],
            "/ping",
            "/invocations",
            mlflow_body,
        ),
    }
    for name, (cmd, ready, path, body) in servers.items():
        port = _free_port()
        proc = subprocess.Popen(
            [c.format(port=port) for c in cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _wait_ready(f"http://127.0.0.1:{port}{ready}")
            url = f"http://127.0.0.1:{port}{path}"
            asyncio.run(_open_loop(url, body, 20, 2))  # warm-up
            rates = []
            for rate in RATES:
                r = asyncio.run(_open_loop(url, body, rate, seconds))
                rates.append(r)
                print(
                    f"{name:<11} {rate:>4} req/s: p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                    f"achieved {r['achieved_rps']:6.1f}/s  errors {r['errors']}",
                    flush=True,
                )
            peak = asyncio.run(_closed_loop(url, body, 8, seconds))
            print(f"{name:<11} peak: {peak['rps']:.1f} req/s (8 clients), errors {peak['errors']}", flush=True)
            out[name] = {"rates": rates, "peak": peak}
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return out


def mm_rate(seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of torch.mm on this machine right now: this VM's speed drifts by 2x."""
    a, b = torch.randn(2048, 1024), torch.randn(1024, 1024)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 2048 * 1024 * 1024 / (time.perf_counter() - start) / 1e9


def write_report(batch: dict[str, Any], online: dict[str, Any], meta: dict[str, Any]) -> str:
    ours, theirs = online["recsys-moe"], online["mlflow"]
    ratio = ours["peak"]["rps"] / theirs["peak"]["rps"]
    at100 = next(r for r in ours["rates"] if r["rate"] == 100)
    lines = [
        "# Serving: batch scoring and the online ranking endpoint",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `python benchmarks/serving_speed.py` "
        f"({online['seconds_per_rate']:.0f} s per rate). The load generator runs on the same 2 cores as "
        "the server under test; one server process each. This VM's speed drifts: fp32 `torch.mm` ran at "
        f"{meta['mm_gflops_before']:.0f} GFLOP/s before and {meta['mm_gflops_after']:.0f} after the run "
        "(164 is the median seen on this machine).",
        "",
        "## Online: `POST /v1/rank`, 1 context + 100 candidates, vs `mlflow models serve` of the same model",
        "",
        "Open loop at fixed rates (latency from the scheduled send time, so queueing shows):",
        "",
        "| server | rate (req/s) | achieved | p50 ms | p99 ms | max ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("recsys-moe", "mlflow"):
        for r in online[name]["rates"]:
            lines.append(
                f"| {name} | {r['rate']} | {r['achieved_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                f"| {r['max_ms']:.1f} | {r['errors']} |"
            )
    lines += [
        "",
        "Closed loop, 8 concurrent clients (peak throughput):",
        "",
        "| server | requests/s | candidates scored/s | p50 ms | errors |",
        "|---|---|---|---|---|",
    ]
    for name in ("recsys-moe", "mlflow"):
        p = online[name]["peak"]
        lines.append(
            f"| {name} | {p['rps']:.1f} | {p['rps'] * online['candidates']:,.0f} | {p['p50_ms']:.1f} | {p['errors']} |"
        )
    lines += [
        "",
        "## Batch scoring (`recsys-moe score`: parquet → parquet, chunks of 65,536 rows)",
        "",
        f"{batch['rows']:,} raw {batch['data']} rows scored by a census-size MMoE (8 experts [64, 32]) in "
        f"{batch['seconds']:.2f} s: **{batch['rows_per_s']:,.0f} rows/s** (best of 3: "
        f"{', '.join(f'{x:,.0f}' for x in batch['all_rows_per_s'])}), including parquet read, validation, "
        "transform, inference, ranking score and parquet write.",
        "",
        "## Targets",
        "",
        f"- p99 ≤ 20 ms at 100 requests/s: {at100['p99_ms']:.1f} ms, **{'met' if at100['p99_ms'] <= 20 else 'not met'}**.",
        f"- ≥ 3× MLflow's serving throughput: {ratio:.1f}×, **{'met' if ratio >= 3 else 'not met'}**.",
        f"- Batch scoring ≥ 200k rows/s: {batch['rows_per_s']:,.0f}, "
        f"**{'met' if batch['rows_per_s'] >= 200_000 else 'not met'}**.",
        "",
        "Raw numbers: `serving.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="seconds per load level")
    parser.add_argument("--batch-rows", type=int, default=500_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    meta["mm_gflops_before"] = mm_rate()
    batch = bench_batch(args.batch_rows)
    print(f"batch scoring: {batch['rows_per_s']:,.0f} rows/s on {batch['rows']:,} {batch['data']} rows", flush=True)
    online = bench_online(args.seconds)
    meta["mm_gflops_after"] = mm_rate()
    report = write_report(batch, online, meta)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.md").write_text(report)
    (args.out / "serving.json").write_text(json.dumps({"meta": meta, "batch": batch, "online": online}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
