"""The online endpoint, over a real socket: uvicorn in a thread, httpx as the client.

It must score exactly like the trainer's evaluation, rank by the combined score, answer every
bad request with a 4xx that names the row and the field (and keep serving), swap champions
under load without failing a request, and survive a schemathesis fuzz run with no 5xx.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import re
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest
import schemathesis
import torch
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.registry.versions import Registry
from recsys_moe.scoring import RankingConfig, Scorer, ranking_score
from recsys_moe.scoring.batch import score_parquet
from recsys_moe.serving.app import create_app
from recsys_moe.serving.settings import ServingSettings

MAX_ROWS = 200
MAX_BODY = 512 * 1024
CONTEXT = ("user_id", "age", "gender", "country", "interests", "signup_days", "device")  # shared by a feed request


@contextmanager
def serve(app: FastAPI, **options: Any) -> Iterator[str]:
    """Run `app` with uvicorn (`options`: more of uvicorn.Config) on a free port of 127.0.0.1 in
    a thread → its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """create_app sets torch's (process-wide) thread count; later test modules get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def holdout(synthetic_manifest: Manifest) -> pl.DataFrame:
    return read_holdout(synthetic_manifest.raw_path("test"))


@pytest.fixture(scope="module")
def scorer(logged_model) -> Scorer:
    return Scorer(logged_model[0].model_dir)


@pytest.fixture(scope="module")
def raw_rows(holdout: pl.DataFrame, scorer: Scorer) -> list[dict[str, Any]]:
    """Holdout rows as JSON-ready dicts of the model's input columns (no keys, no Int8 labels)."""
    return holdout.select(scorer.input_columns).head(MAX_ROWS).to_dicts()


@pytest.fixture(scope="module")
def client(logged_model) -> Iterator[httpx.Client]:
    app = create_app(ServingSettings(model_dir=logged_model[0].model_dir, max_rows=MAX_ROWS, max_body_bytes=MAX_BODY))
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def _feed(rows: list[dict[str, Any]], n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A rank request's context (the first row's user) and n candidates (the rest of each row)."""
    context = {k: rows[0][k] for k in CONTEXT}
    return context, [{k: v for k, v in r.items() if k not in CONTEXT} for r in rows[:n]]


def _ok(client: httpx.Client, rows: list[dict[str, Any]]) -> None:
    response = client.post("/v1/score", json={"rows": rows[:3]})
    assert response.status_code == 200, response.text


# -- 1. the same scores three ways: trainer evaluation, batch scoring, HTTP -------------------------
def test_same_scores_three_ways(
    client: httpx.Client, logged_model, holdout: pl.DataFrame, raw_rows, scorer: Scorer, tmp_path: Path
) -> None:
    result, _ = logged_model
    trainer = result.test.scores.numpy()[:MAX_ROWS]  # the trainer's evaluation of the test split

    source, out = tmp_path / "rows.parquet", tmp_path / "scores.parquet"
    holdout.head(MAX_ROWS).write_parquet(source)
    report = score_parquet(scorer, source, out, chunk_rows=64, progress=False)
    assert report.rows_out == MAX_ROWS and report.rejects is None
    batch = pl.read_parquet(out).select(scorer.tasks).to_numpy()

    response = client.post("/v1/score", json={"rows": raw_rows})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tasks"] == scorer.tasks == ["click", "conversion"]
    assert body["model"]["version"] == "local" and body["model"]["run_id"] == result.run_id
    assert response.headers["x-model-version"] == "local"
    http = np.array([[s[t] for t in body["tasks"]] for s in body["scores"]])

    assert trainer.shape == batch.shape == http.shape == (MAX_ROWS, 2)
    np.testing.assert_allclose(batch, trainer, rtol=0, atol=1e-5)
    np.testing.assert_allclose(http, trainer, rtol=0, atol=1e-5)
    np.testing.assert_allclose(http, batch, rtol=0, atol=1e-5)


# -- 2. ranking ----------------------------------------------------------------------------------
def test_rank_sorts_100_candidates_by_the_combined_score(client: httpx.Client, raw_rows, holdout, scorer) -> None:
    context, candidates = _feed(raw_rows, 100)
    candidates[7]["age"] = 99  # a candidate's field wins over the context's
    candidates[9]["device"] = None  # ... even when it is null
    response = client.post("/v1/rank", json={"context": context, "candidates": candidates})
    assert response.status_code == 200, response.text
    ranked = response.json()["candidates"]
    assert sorted(c["index"] for c in ranked) == list(range(100))

    merged = pl.DataFrame([{**context, **c} for c in candidates], schema=holdout.select(scorer.input_columns).schema)
    expected = scorer.score(merged).scores
    combined = ranking_score(expected, scorer.tasks, RankingConfig())
    order = [c["index"] for c in ranked]
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(ranked))
    np.testing.assert_allclose([c["score"] for c in ranked], combined[order], rtol=0, atol=2e-5)
    got = np.array([[c["scores"][t] for t in scorer.tasks] for c in ranked])
    np.testing.assert_allclose(got, expected[order], rtol=0, atol=1e-5)

    top = client.post("/v1/rank", json={"context": context, "candidates": candidates, "top_k": 5}).json()
    assert [c["index"] for c in top["candidates"]] == order[:5]

    by_conversion = {"kind": "weighted_sum", "weights": {"click": 0, "conversion": 1}}
    alt = client.post("/v1/rank", json={"context": context, "candidates": candidates, "ranking": by_conversion})
    assert alt.status_code == 200 and alt.json()["ranking"] == by_conversion
    conv = [c["scores"]["conversion"] for c in alt.json()["candidates"]]
    assert conv == sorted(conv, reverse=True)


# -- 3. bad requests: 4xx that name the field; the server keeps serving ---------------------------
def test_bad_requests_name_the_row_and_field(client: httpx.Client, raw_rows) -> None:
    rows = raw_rows[:3]
    context, candidates = _feed(raw_rows, 3)

    def bad(path: str, payload: Any, status: int = 422, **kwargs: Any) -> dict[str, Any]:
        response = client.post(path, json=payload, **kwargs) if payload is not None else client.post(path, **kwargs)
        assert response.status_code == status, response.text
        _ok(client, raw_rows)
        return response.json()

    body = bad("/v1/score", {"rows": [rows[0], {**rows[1], "agee": 30}]})
    assert body["detail"][0]["loc"] == ["body", "rows", 1, "agee"] and body["detail"][0]["field"] == "agee"
    assert "unknown field 'agee'" in body["error"]

    body = bad("/v1/score", {"rows": [{**rows[0], "age": "old"}]})
    item = body["detail"][0]
    assert item["loc"] == ["body", "rows", 0, "age"]
    assert (item["row"], item["field"], item["type"]) == (0, "age", "float_type")
    assert "expected a finite number" in body["error"]
    bad("/v1/score", {"rows": [{**rows[0], "user_id": True}]})  # a bool is not an id
    bad("/v1/score", {"rows": [{**rows[0], "interests": "a,b"}]})  # a multi-hot is a list

    body = bad("/v1/score", {"rows": [rows[0], {**rows[1], "age": -5}, rows[2]]})
    assert body["error"] == "rows[1].age: age: -5.0 is below the minimum 0.0"
    assert (body["detail"][0]["row"], body["detail"][0]["field"]) == (1, "age")

    body = bad("/v1/rank", {"context": context, "candidates": [candidates[0], {**candidates[1], "price": -1.0}]})
    assert body["detail"][0]["loc"] == ["body", "candidates", 1, "price"]
    body = bad("/v1/rank", {"context": {**context, "age": 500}, "candidates": candidates})
    assert body["detail"] == [
        {
            "loc": ["body", "context", "age"],
            "row": None,
            "field": "age",
            "type": "rejected",
            "msg": "context.age: age: 500.0 is above the maximum 130.0",
        }
    ]
    body = bad("/v1/rank", {"candidates": candidates, "ranking": {"weights": {"dwell": 1}}})
    assert "unknown tasks ['dwell']" in body["error"]
    bad("/v1/rank", {"candidates": candidates, "top_k": 0})

    body = bad("/v1/score", {"rows": [rows[0]] * (MAX_ROWS + 1)})
    assert f"{MAX_ROWS + 1} rows is over the limit of {MAX_ROWS}" in body["error"]
    body = bad("/v1/score", None, content=b'{"rows": [', headers={"content-type": "application/json"})
    assert body["error"].startswith("body: not valid JSON")
    bad("/v1/score", {"rows": rows, "extra": 1})
    bad("/v1/score", [rows])
    body = bad("/v1/score", None, 413, content=b" " * (MAX_BODY + 1))
    assert str(MAX_BODY) in body["error"]
    bad("/v1/score", None, 413, content=iter([b" " * 65536] * (MAX_BODY // 65536 + 1)))  # chunked, no length

    unseen = {**rows[0], "item_id": "never-seen-item", "category": "brand-new", "brand": "???", "interests": ["new"]}
    response = client.post("/v1/score", json={"rows": [unseen, {"user_id": 1}, {}]})  # missing fields are null
    assert response.status_code == 200, response.text
    assert len(response.json()["scores"]) == 3
    assert client.post("/v1/score", json={"rows": []}).json()["scores"] == []


def test_bearer_token(logged_model, raw_rows) -> None:
    app = create_app(ServingSettings(model_dir=logged_model[0].model_dir, token="s3cret"))
    payload = {"rows": raw_rows[:2]}
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = http.post("/v1/score", json=payload, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert http.post("/v1/score", json=payload, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.post("/v1/rank", json={"candidates": raw_rows[:2]}).status_code == 401
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
        assert "HTTPBearer" in http.get("/openapi.json").json()["components"]["securitySchemes"]


# -- 4. champion swap under load ------------------------------------------------------------------
def _versions_seen(url: str, rows: list[dict[str, Any]], stop: threading.Event, out: list[Any]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            try:
                response = http.post("/v1/score", json={"rows": rows})
                out.append((response.status_code, response.json()["model"]["version"]))
            except Exception as exc:  # recorded, and fails the test
                out.append((repr(exc), None))


def _wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_champion_swap_under_load_fails_no_request(
    logged_model, registry_store: str, raw_rows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    _, model_uri = logged_model
    registry, name = Registry(registry_store), "serving-swap"
    v1, v2 = registry.register(model_uri, name), registry.register(model_uri, name)
    registry.client.set_registered_model_alias(name, "champion", v1)
    settings = ServingSettings(model_uri=f"models:/{name}@champion", tracking_uri=registry_store, poll_seconds=0.5)
    app = create_app(settings)
    holder = app.state.holder
    assert holder.current.version == v1
    with serve(app) as url:
        stop, seen = threading.Event(), [[] for _ in range(3)]
        clients = [threading.Thread(target=_versions_seen, args=(url, raw_rows[:20], stop, s)) for s in seen]
        for c in clients:
            c.start()
        try:
            _wait_for(lambda: all(len(s) >= 5 for s in seen), "requests on v1")
            registry.client.set_registered_model_alias(name, "champion", v2)
            holder.refresh()  # at once (the poller may get there first: then this is a no-op)
            assert holder.current.version == v2
            marks = [len(s) for s in seen]
            _wait_for(lambda: all(len(s) >= m + 5 for s, m in zip(seen, marks)), "requests on v2")
            registry.client.set_registered_model_alias(name, "champion", v1)  # a rollback: the poller follows
            _wait_for(lambda: holder.current.version == v1, "the poller to follow the alias back")
            marks = [len(s) for s in seen]
            _wait_for(lambda: all(len(s) >= m + 5 for s, m in zip(seen, marks)), "requests after the rollback")
        finally:
            stop.set()
            for c in clients:
                c.join(timeout=30)
        for s in seen:
            assert {status for status, _ in s} == {200}, [x for x in s if x[0] != 200][:3]
            versions = [v for _, v in s]
            switches = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
            assert switches == [v1, v2, v1], switches  # v1, then v2, then v1 again: never back and forth
        metrics = httpx.get(f"{url}/metrics").text
        assert "recsys_serving_model_swaps_total 2.0" in metrics
        assert f'recsys_serving_model_info{{name="{name}",' in metrics and f'version="{v1}"' in metrics
        assert f"recsys_serving_model_version {float(v1)}" in metrics
        assert httpx.get(f"{url}/readyz").json()["model"]["version"] == v1


def test_a_serving_process_freezes_its_heap_and_frees_a_swapped_out_model(
    logged_model, registry_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` freezes the heap after each load (a full GC over ~430k objects paused a request for
    250 ms); with the heap frozen, a swap must still free the old model, not keep it for good."""
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    registry, name = Registry(registry_store), "serving-freeze"
    v1, v2 = registry.register(logged_model[1], name), registry.register(logged_model[1], name)
    registry.client.set_registered_model_alias(name, "champion", v1)
    settings = ServingSettings(model_uri=f"models:/{name}@champion", tracking_uri=registry_store, poll_seconds=0)
    try:
        app = create_app(settings, freeze_heap=True)
        holder = app.state.holder
        assert gc.get_freeze_count() > 0
        old_model = weakref.ref(holder.current.scorer.model)
        registry.client.set_registered_model_alias(name, "champion", v2)
        assert holder.refresh() and holder.current.version == v2
        assert old_model() is None, "the swapped-out model is still alive after the swap"
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_waits_for_an_alias_that_does_not_exist_yet(
    logged_model, registry_store: str, raw_rows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_MOE_CACHE", str(tmp_path / "cache"))
    registry, name = Registry(registry_store), "serving-later"
    uri = f"models:/{name}@champion"
    with pytest.raises(RuntimeError, match="has no alias 'champion'"):
        create_app(ServingSettings(model_uri=uri, tracking_uri=registry_store))
    app = create_app(ServingSettings(model_uri=uri, tracking_uri=registry_store, wait_for_model=True, poll_seconds=0))
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 503 and http.get("/readyz").json()["ready"] is False
        assert http.post("/v1/score", json={"rows": raw_rows[:2]}).status_code == 503
        version = registry.register(logged_model[1], name)
        registry.client.set_registered_model_alias(name, "champion", version)
        assert app.state.holder.refresh()
        assert http.get("/readyz").json()["model"]["version"] == version
        assert http.post("/v1/score", json={"rows": raw_rows[:2]}).status_code == 200


def _tracked_scoring(app: FastAPI, hold: threading.Event | None = None) -> dict[str, Any]:
    """Wrap the loaded scorer's fast path: record how many requests score at once and whether
    each ran in the event loop's thread; with `hold`, each waits for it (at most 10 s)."""
    score_rows = app.state.holder.current.scorer.score_rows
    seen: dict[str, Any] = {"active": 0, "peak": 0, "in_loop": []}
    lock = threading.Lock()

    def tracked(*args: Any) -> Any:
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        with lock:
            seen["active"] += 1
            seen["peak"] = max(seen["peak"], seen["active"])
            seen["in_loop"].append(in_loop)
        try:
            if hold is not None:
                hold.wait(10)
            else:
                time.sleep(0.02)  # long enough for the others to pile up
            return score_rows(*args)
        finally:
            with lock:
                seen["active"] -= 1

    app.state.holder.current.scorer.score_rows = tracked
    return seen


@contextmanager
def _ranks_in_flight(http: httpx.Client, raw_rows: list[dict[str, Any]], n: int) -> Iterator[list[int]]:
    """`n` /v1/rank requests sent at once, each from its own thread; the block runs while they are
    in flight, and leaving it waits for them → their status codes, in the order they finished."""
    context, candidates = _feed(raw_rows, 20)
    results: list[int] = []

    def one() -> None:
        results.append(http.post("/v1/rank", json={"context": context, "candidates": candidates}).status_code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        for t in threads:
            t.join(30)


def test_with_one_scoring_worker_requests_are_scored_one_at_a_time_in_the_event_loop(logged_model, raw_rows) -> None:
    """12 concurrent requests: scored one at a time, each in the event loop's own thread (no hop
    to a worker thread), every one answered, and a probe sent meanwhile answered too."""
    app = create_app(ServingSettings(model_dir=logged_model[0].model_dir, scoring_workers=1))
    seen = _tracked_scoring(app)
    with (
        serve(app) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        _ranks_in_flight(http, raw_rows, 12) as results,
    ):
        time.sleep(0.05)
        assert http.get("/healthz").status_code == 200  # after the requests already read
    assert results == [200] * 12
    assert seen["peak"] == 1
    assert seen["in_loop"] == [True] * 12


def test_more_scoring_threads_than_cores_are_warned_about_at_startup(logged_model, caplog, monkeypatch) -> None:
    """Workers x torch threads past the cores only contend: the server says so when it starts."""
    monkeypatch.setattr("recsys_moe.serving.app.available_cpus", lambda: 2)
    model_dir = logged_model[0].model_dir
    with caplog.at_level(logging.WARNING, logger="recsys_moe.serving.app"):
        create_app(ServingSettings(model_dir=model_dir, scoring_workers=2, torch_threads=1))
        assert not [r for r in caplog.records if "contend" in r.getMessage()]
        create_app(ServingSettings(model_dir=model_dir, scoring_workers=2, torch_threads=2))
    (warning,) = [r.getMessage() for r in caplog.records if "contend" in r.getMessage()]
    assert "2 scoring worker(s) x 2 torch thread(s) = 4 threads for 2 core(s)" in warning


def test_with_two_scoring_workers_requests_score_in_threads_and_probes_are_answered_meanwhile(
    logged_model, raw_rows
) -> None:
    """Two workers: scoring leaves the event loop free, so a probe is answered while both
    workers are busy and more requests queue; never more than two score at once."""
    app = create_app(ServingSettings(model_dir=logged_model[0].model_dir, scoring_workers=2))
    hold = threading.Event()
    seen = _tracked_scoring(app, hold)
    with (
        serve(app) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        _ranks_in_flight(http, raw_rows, 6) as results,
    ):
        try:
            deadline = time.monotonic() + 10
            while seen["active"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert seen["active"] == 2  # both workers busy, the other requests queued
            probe = http.get("/healthz", timeout=5)
            assert probe.status_code == 200 and seen["active"] == 2  # answered while they were held
        finally:
            hold.set()
    assert results == [200] * 6
    assert seen["peak"] == 2
    assert seen["in_loop"] == [False] * 6


# -- 5. operations and fuzzing ---------------------------------------------------------------------
def test_metrics_and_readiness(client: httpx.Client, raw_rows, scorer: Scorer) -> None:
    _ok(client, raw_rows)
    client.post("/v1/score", json={"rows": [{"nope": 1}]})
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["model"]["version"] == "local" and ready.json()["model"]["tasks"] == scorer.tasks
    assert client.get("/healthz").json() == {"status": "ok"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for line in (
        'recsys_serving_requests_total{endpoint="/v1/score",status="200"}',
        'recsys_serving_requests_total{endpoint="/v1/score",status="422"}',
        'recsys_serving_request_seconds_bucket{endpoint="/v1/score",le="0.02"}',
        'recsys_serving_rows_scored_total{endpoint="/v1/score"}',
        "recsys_serving_model_info{name=",
        "recsys_serving_model_swaps_total 0.0",
    ):
        assert line in text, line
    assert client.get("/no/such/path").status_code == 404
    assert 'recsys_serving_requests_total{endpoint="other",status="404"}' in client.get("/metrics").text


def test_openapi_describes_the_loaded_models_fields(client: httpx.Client, scorer: Scorer) -> None:
    assert client.get("/docs").status_code == 200
    doc = client.get("/openapi.json").json()
    row = doc["components"]["schemas"]["FeatureRow"]
    assert list(row["properties"]) == scorer.input_columns and row["additionalProperties"] is False
    assert row["properties"]["age"]["minimum"] == 0 and row["properties"]["age"]["maximum"] == 130
    body = doc["paths"]["/v1/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/RankRequest"}


def test_docs_work_offline(client: httpx.Client) -> None:
    """/docs references no external URL: every script, stylesheet and icon it loads comes from
    this server (the swagger-ui-bundle package), and each of them is served."""
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert not re.findall(r"(?:https?:)?//[\w.-]+", html), "absolute URLs in /docs"
    loaded = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert len(loaded) == 4, loaded  # stylesheet, icon, script, the OpenAPI document
    for path in loaded:
        asset = client.get(path)
        assert asset.status_code == 200 and len(asset.content) > 100, path
        if path.endswith(".css"):  # a stylesheet's url(...) would be fetched too
            assert not re.findall(r"url\(\s*['\"]?(?:https?:)?//", asset.text)
    assert '"validatorUrl": null' in html  # else the page calls validator.swagger.io
    assert client.get("/redoc").status_code == 404  # ReDoc's page would load from a CDN


def test_fuzzed_requests_never_get_a_server_error(logged_model) -> None:
    """Schemathesis cases from the app's own OpenAPI, valid (positive) and invalid (negative) ones.
    Run through `as_strategy` under `@given`: schemathesis 4.32's fixture-based `from_fixture`
    loader sets `Function._nodeid`, which pytest 9 no longer has."""
    app = create_app(ServingSettings(model_dir=logged_model[0].model_dir, max_rows=20))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = {f"{o.ok().method.upper()} {o.ok().path}" for o in schema.get_all_operations()}
    assert {"POST /v1/score", "POST /v1/rank", "GET /readyz", "GET /metrics", "GET /healthz"} <= operations
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    statuses: set[int] = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    @given(case=cases)
    def no_server_error(case: Any) -> None:
        response = case.call()
        statuses.add(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"

    no_server_error()
    assert 200 in statuses and 422 in statuses  # it reached the model, and it sent bad input
