"""Serving speed: batch scoring rows/s, and the online endpoint against `mlflow models serve`.

    make bench-serving        # or: python benchmarks/serving_speed.py [--seconds 10]

1. Batch scoring: a census-size MMoE (8 experts [64, 32], the census benchmark's model; trained
   briefly here, speed does not depend on quality) scores the census test rows repeated to
   ~500k rows through `scoring.batch.score_parquet` (parquet in → parquet out). Falls back to
   the synthetic data set when `../shared/data/census-income` is absent.
2. Online: a synthetic feed model (user context + item candidates) is logged to a temporary
   MLflow store and served two ways on loopback, one worker process each:
   `recsys-moe serve` (`POST /v1/rank`, one context + 100 candidates) and `mlflow models serve`
   of the same logged model (`POST /invocations` with the same 100 rows, context merged in, as
   MLflow's pyfunc has no notion of a shared context). An open-loop load generator (asyncio +
   aiohttp, requests scheduled at a fixed rate; latency counted from the scheduled time, so a
   slow server cannot hide queueing) runs each rate for `--seconds`; then a closed loop with 8
   concurrent clients measures the peak throughput (best of 3), quiet and beside a process
   spinning one core. The load generator shares the 2 cores.
3. Where a `/v1/rank` request's time goes: each stage of the handler timed in process, beside
   the bare model forward of the same rows; and the bare model's rate on the batch rows, which
   batch scoring is judged against; and batch scoring's peak RSS on that input and on five
   times as many rows (a fresh process each).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import polars as pl
import torch

from recsys_moe.config import load_config
from recsys_moe.features import load_spec
from recsys_moe.pipelines.build import build
from recsys_moe.pipelines.sources import synthetic
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.scoring import Scorer, ranking_score
from recsys_moe.scoring.batch import score_parquet
from recsys_moe.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "serving"
CENSUS = ROOT.parent / "shared" / "data" / "census-income"
ROUNDS = 7  # batch scoring vs the bare model: alternating rounds, the median share reported
MODEL = ["model.arch=mmoe", "model.num_experts=8", "model.expert_hidden=[64,32]", "model.tower_hidden=[16]"]
USER_COLUMNS = ["user_id", "country", "gender", "age", "interests", "signup_days"]
CANDIDATES = 100
RATES = (50, 100, 150, 200)


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
    bare = bare_inference(bundle, source)
    score_parquet(scorer, source, CACHE / "warmup.parquet", progress=False)  # warm caches, page in
    # Alternating rounds, each a batch run and the bare model right after it: the machine's
    # speed drifts by more than the gap being measured, so each round gives its own ratio.
    rounds = []
    for _ in range(ROUNDS):
        run = score_parquet(scorer, source, CACHE / "scores.parquet", progress=False)
        rounds.append({"seconds": run.seconds, "rows_per_s": run.rows_per_s, "bare_rows_per_s": bare()})
    for r in rounds:
        r["share"] = r["rows_per_s"] / r["bare_rows_per_s"]
    median = sorted(rounds, key=lambda r: r["share"])[len(rounds) // 2]
    large = CACHE / f"batch-{name}-x5.parquet"
    pl.concat([pl.read_parquet(source)] * 5).write_parquet(large, row_group_size=65_536)
    rss = {"1x": peak_rss_mib(bundle, source), "5x": peak_rss_mib(bundle, large)}
    large.unlink()
    return {
        "peak_rss_mib": rss,
        "data": name,
        "rows": run.rows_in,
        "rounds": rounds,
        **median,
    }


RSS_PROBE = """
import resource, sys
from pathlib import Path
from recsys_moe.scoring import Scorer
from recsys_moe.scoring.batch import score_parquet
score_parquet(Scorer(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss_mib(bundle: Path, source: Path) -> float:
    """Peak resident memory of a fresh process that scores `source` (MiB)."""
    out = CACHE / "rss-probe.parquet"
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(bundle), str(source), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


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


def _best_closed_loop(url: str, body: dict, seconds: float, tries: int = 3) -> dict[str, Any]:
    """The best of `tries` closed-loop runs: this VM's speed drifts by 2x within minutes (other
    tenants), and a peak is what the server can do, not what the slowest minute allowed."""
    runs = [asyncio.run(_closed_loop(url, body, 8, seconds)) for _ in range(tries)]
    best = max(runs, key=lambda r: r["rps"])
    return {**best, "all_rps": [r["rps"] for r in runs]}


def _mean_ms(fn: Any, n: int) -> float:
    for _ in range(max(10, n // 10)):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def profile_rank(model_dir: Path, body: dict[str, Any], n: int = 300) -> dict[str, Any]:
    """Where one `/v1/rank` request's server time goes, in process, on the server's one thread
    per request: each stage of `Service.rank` timed on its own (mean ms over `n` runs), the whole
    handler, and the bare model forward of the same rows (tensors already built) it is judged by.
    The general path (a polars frame through the input contract), which the handler takes only
    when a row may be rejected, is timed on the same rows for comparison."""
    from recsys_moe.data.loader import InMemoryDataset
    from recsys_moe.serving.app import Rows, Service, candidate_rows, create_app
    from recsys_moe.serving.settings import ServingSettings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = ServingSettings(model_dir=model_dir)
    app = create_app(settings)
    service = Service(settings, app.state.holder, app.state.metrics)
    loaded = app.state.holder.current
    scorer, models = loaded.scorer, loaded.models
    payload = json.dumps(body).encode()
    request = models.rank.model_validate_json(payload)
    items = models.field_items()
    rows = len(request.candidates)

    def split() -> Rows:
        return candidate_rows(request, items)

    split_rows = split()
    scorer.score_rows(split_rows.columns, rows, split_rows.shared)
    encoder = scorer._rows
    dense, sparse = encoder.encode(split_rows.columns, rows, split_rows.shared)
    frame = models.frame(split_rows.merged())
    context_row = frame.head(1)  # the context as one more row: the bare forward of 1 + 100 rows
    bare_dataset = InMemoryDataset(scorer.encode(scorer.validate(pl.concat([context_row, frame]))[0]), scorer.manifest, scorer.model.sparse.keys, tasks=None)  # fmt: skip
    bare_batch = bare_dataset.batch(torch.arange(len(bare_dataset)))
    scores = scorer.model.predict(dense, sparse).detach().numpy()

    def respond() -> None:
        combined = ranking_score(scores, scorer.tasks, settings.ranking)
        order = np.argsort(-combined, kind="stable")
        ranked = [
            {"index": int(i), "score": float(combined[i]), "scores": dict(zip(scorer.tasks, s))}
            for i, s in zip(order.tolist(), scores[order].tolist())
        ]
        msgspec.json.encode({"candidates": ranked})

    with torch.inference_mode():
        stages = {
            "parse + validate the JSON body (pydantic-core)": _mean_ms(
                lambda: models.rank.model_validate_json(payload), n
            ),
            "request → columns (context fields given once)": _mean_ms(split, n),
            "encode: vocabularies, transforms, KJT (scoring.rows)": _mean_ms(
                lambda: encoder.encode(split_rows.columns, rows, split_rows.shared), n
            ),
            "model forward (embeddings + MMoE + towers)": _mean_ms(lambda: scorer.model.predict(dense, sparse), n),
            "ranking + response JSON": _mean_ms(respond, n),
        }
        general = _mean_ms(lambda: scorer.score(models.frame(split_rows.merged())), n)

    def bare_forward() -> None:
        with torch.inference_mode():
            scorer.model.predict(bare_batch.dense, bare_batch.sparse)

    # The two figures the target compares, timed in alternating rounds (best round of each), so
    # this VM's drift cannot favour one of them.
    total = bare = float("inf")
    for _ in range(5):
        total = min(total, _mean_ms(lambda: service.rank(payload), n // 5))
        bare = min(bare, _mean_ms(bare_forward, n // 5))
    torch.set_num_threads(threads)
    return {
        "stages": stages,
        "handler_ms": total,
        "bare_forward_ms": bare,
        "general_path_ms": general,
        "rows": rows + 1,
    }


def bare_inference(bundle: Path, source: Path) -> Callable[[], float]:
    """The model alone on the batch benchmark's rows, the rate batch scoring is judged by: a
    function that times one pass (rows/s) over the rows encoded and turned into tensors
    beforehand, in the scorer's own inference batches."""
    from recsys_moe.data.loader import InMemoryDataset

    scorer = Scorer(bundle)
    encoded = scorer.encode(scorer.validate(pl.read_parquet(source))[0])
    dataset = InMemoryDataset(encoded, scorer.manifest, scorer.model.sparse.keys, tasks=None)
    batches = list(dataset.batches(scorer.batch_size))
    with torch.inference_mode():
        scorer.model.predict(batches[0].dense, batches[0].sparse)

    def rate() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            for b in batches:
                scorer.model.predict(b.dense, b.sparse)
        return len(dataset) / (time.perf_counter() - start)

    return rate


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
    out["profile"] = profile_rank(result.model_dir, ours_body)
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
            peak = _best_closed_loop(url, body, seconds)
            print(f"{name:<11} peak: {peak['rps']:.1f} req/s (8 clients), errors {peak['errors']}", flush=True)
            out[name] = {"rates": rates, "peak": peak}
            if name == "recsys-moe":  # the same closed loop beside a process spinning one core
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    time.sleep(0.5)
                    out[name]["peak_beside_neighbour"] = _best_closed_loop(url, body, seconds)
                finally:
                    spinner.kill()
                    spinner.wait()
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
    at150 = next(r for r in ours["rates"] if r["rate"] == 150)
    prof = online["profile"]
    handler_x = prof["handler_ms"] / prof["bare_forward_ms"]
    batch_share = batch["rows_per_s"] / batch["bare_rows_per_s"]
    rss = batch["peak_rss_mib"]
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
        "Closed loop, 8 concurrent clients (peak throughput: the best of 3 runs; all three in `serving.json`):",
        "",
        "| server | requests/s | candidates scored/s | p50 ms | errors |",
        "|---|---|---|---|---|",
    ]
    for name in ("recsys-moe", "mlflow"):
        p = online[name]["peak"]
        lines.append(
            f"| {name} | {p['rps']:.1f} | {p['rps'] * online['candidates']:,.0f} | {p['p50_ms']:.1f} | {p['errors']} |"
        )
    busy = ours["peak_beside_neighbour"]
    slowdown = ours["peak"]["rps"] / busy["rps"]
    lines += [
        "",
        f"Beside a process spinning one core (the load generator shares the cores too): recsys-moe's closed loop "
        f"does {busy['rps']:.1f} requests/s (p50 {busy['p50_ms']:.1f} ms, {busy['errors']} errors), "
        f"against {ours['peak']['rps']:.1f} quiet: quiet / busy = {slowdown:.2f}. The server scores on one core "
        "(one scoring worker on 2 cores: requests are scored in the event loop's thread), so the neighbour mostly "
        "takes the core it leaves.",
    ]
    stage_sum = sum(prof["stages"].values())
    lines += [
        "",
        "## Where a `/v1/rank` request's server time goes",
        "",
        f"In process, one thread (the server's per-request setting), mean of 300 runs each: every stage of the "
        f"handler on its own, then the whole handler (it and the bare forward: best of 5 alternating rounds of 60), against the bare model forward of the same "
        f"{prof['rows']} rows (context + candidates, tensors already built). HTTP (uvicorn and the event loop, which "
        "scores the request itself with one scoring worker) comes on top: compare the closed-loop figure above.",
        "",
        "| stage | ms | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v:.3f} | {v / stage_sum:.0%} |" for k, v in prof["stages"].items()]
    lines += [
        f"| **the whole handler** (`Service.rank`) | **{prof['handler_ms']:.3f}** | |",
        f"| bare model forward, {prof['rows']} rows | {prof['bare_forward_ms']:.3f} | |",
        f"| the general path on the same rows (polars frame → input contract → encode → tensors → forward) "
        f"| {prof['general_path_ms']:.3f} | |",
        "",
        f"The handler costs {handler_x:.1f}× the bare forward. Rows that are certainly valid (the types the "
        "request models produce, no null where the spec forbids one, dense values within range) are encoded "
        "without a data frame (`recsys_moe/scoring/rows.py`); a request with any other row takes the general "
        f"path ({prof['general_path_ms'] / prof['bare_forward_ms']:.1f}× the bare forward for these rows, "
        "before parsing and the response), whose input contract names each reject. "
        "`tests/test_row_encoder.py` holds the two paths to the same scores (1e-6) and the same rejects.",
    ]
    lines += [
        "",
        "## Batch scoring (`recsys-moe score`: parquet → parquet, chunks of 65,536 rows)",
        "",
        f"{batch['rows']:,} raw {batch['data']} rows scored by a census-size MMoE (8 experts [64, 32]) in "
        f"{batch['seconds']:.2f} s: **{batch['rows_per_s']:,.0f} rows/s**, including parquet read, validation, "
        "transform, inference, ranking score and parquet write, against the bare model on the same rows (encoded "
        f"and turned into tensors beforehand, in the scorer's inference batches): {batch['bare_rows_per_s']:,.0f} rows/s. "
        f"Batch scoring runs at **{batch_share:.0%}** of the bare model: the median of {len(batch['rounds'])} "
        "rounds, each a batch run with the bare model timed right after it (the machine's speed drifts more "
        "between minutes than within a round):",
        "",
        "| round | batch scoring rows/s | bare model rows/s | share |",
        "|---:|---:|---:|---:|",
        *(
            f"| {i} | {r['rows_per_s']:,.0f} | {r['bare_rows_per_s']:,.0f} | {r['share']:.0%} |"
            for i, r in enumerate(batch["rounds"], 1)
        ),
        "",
        "The input streams through polars' streaming engine (read ahead in its threads while a chunk is scored). "
        f"Peak RSS of a fresh `score` process: {rss['1x']:,.0f} MiB on this input, {rss['5x']:,.0f} MiB on the "
        f"same rows five times over ({rss['5x'] / rss['1x']:.2f}x for 5x the rows): memory follows the chunk, "
        "not the input.",
        "",
        "## Targets (ratios within this run)",
        "",
        f"- `/v1/rank` server time ≤ 4× the bare forward of the same rows: {handler_x:.1f}×, "
        f"**{'met' if handler_x <= 4 else 'not met'}**.",
        f"- Closed-loop throughput ≥ 300 requests/s: {ours['peak']['rps']:.0f}, "
        f"**{'met' if ours['peak']['rps'] >= 300 else 'not met'}**.",
        f"- p99 ≤ 20 ms at 150 requests/s open loop: {at150['p99_ms']:.1f} ms, "
        f"**{'met' if at150['p99_ms'] <= 20 else 'not met'}**.",
        f"- Batch scoring ≥ 70% of the bare model's rate: {batch_share:.0%}, **{'met' if batch_share >= 0.7 else 'not met'}**.",
        f"- Batch scoring's peak RSS bounded on an input 5× larger: {rss['5x'] / rss['1x']:.2f}× the 1× peak, "
        f"**{'met' if rss['5x'] <= 1.5 * rss['1x'] else 'not met'}** (bounded: ≤ 1.5×).",
        f"- Serving beside a CPU-bound neighbour slows by at most the fair share (≤ 2.5×): {slowdown:.2f}×, "
        f"**{'met' if slowdown <= 2.5 else 'not met'}**.",
        f"- Against `mlflow models serve` (context merged into each row): {ratio:.1f}× its peak throughput.",
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
