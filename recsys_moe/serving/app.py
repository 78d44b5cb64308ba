"""The online scoring and ranking HTTP endpoint.

    POST /v1/score   {"rows": [{raw features}, ...]}                 → per-task scores, in row order
    POST /v1/rank    {"context": {...}, "candidates": [{...}, ...]}  → candidates, best first
    GET  /healthz    the process is alive
    GET  /readyz     200 once a model is loaded (says which), else 503
    GET  /metrics    Prometheus text
    GET  /docs, /openapi.json  (Swagger UI from the installed swagger-ui-bundle: no CDN, works offline)

Rows go through `recsys_moe.scoring.Scorer`, the code path of batch scoring and the promotion
gate, so the endpoint cannot drift from training. The request models are generated from the
loaded model's feature spec and swapped with it (see `serving.model_holder`); the request body is
therefore read and validated by hand rather than by a static FastAPI body parameter, and the
OpenAPI document is given the models of the spec loaded at startup.

Hot path: the body is parsed and validated by pydantic-core straight from bytes; rows that are
certainly valid are encoded without a data frame (`scoring.rows`), the others go through the
general path, whose input contract names the rejects. At most `scoring_workers` requests are
scored at once, so parallel requests do not thrash the cores; with one (the default on 2 or 3
cores) they are scored in the event loop's own thread, with more in worker threads (`_Workers`).
Any bad input is a 4xx that names the row and the field; a 5xx means a bug.
"""

from __future__ import annotations

import gc
import hmac
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from recsys_moe.pipelines.validate import REASON, SchemaError
from recsys_moe.scoring import RankingConfig, ranking_score
from recsys_moe.scoring.scorer import ROW
from recsys_moe.serving.model_holder import LoadedModel, ModelHolder
from recsys_moe.serving.prom import Metrics, MetricsMiddleware
from recsys_moe.serving.protocol import timed_protocol
from recsys_moe.serving.schemas import ErrorBody, RankResponse, ReadyBody, RequestModels, ScoreResponse
from recsys_moe.serving.settings import ServingSettings
from recsys_moe.threads import available_cpus

log = logging.getLogger(__name__)

# nginx's status for a request the client abandoned: not the server's fault, so not a 5xx. No one
# receives the response; /metrics counts it apart from real errors.
CLIENT_CLOSED = 499
MAX_DETAIL = 50  # error items per response: enough to fix a request, small enough for 1000 bad rows
Loc = list[str | int]


class ApiError(Exception):
    """A request the server refuses: becomes `ErrorBody` JSON with `status`."""

    def __init__(
        self, status: int, error: str, detail: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail or [], headers


def _item(loc: Loc, msg: str, kind: str, row: int | None = None, field: str | None = None) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind, "row": row, "field": field}


def _path(loc: Loc) -> str:
    """('rows', 3, 'age') → 'rows[3].age'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- validation errors ---------------------------------------------------------------------------
ROW_LISTS = ("rows", "candidates")


def _field_at(loc: tuple[Any, ...]) -> tuple[int, int | None]:
    """(length of the loc up to a row's field, or 0 when it is not in a row's field; the row index)."""
    row = loc[1] if len(loc) >= 2 and loc[0] in ROW_LISTS and isinstance(loc[1], int) else None
    if row is not None and len(loc) >= 3:
        return 3, row
    if len(loc) >= 2 and loc[0] == "context":
        return 2, None
    return 0, row


def validation_error(exc: ValidationError, models: RequestModels, max_rows: int) -> ApiError:
    """pydantic errors → a 422 whose items name the row and the field, one item per field."""
    columns = {c.name: c for c in models.columns}
    items, seen = [], set()
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        depth, row = _field_at(loc)
        if depth:
            loc = loc[:depth]  # drop union-member tags such as ('age', 'str')
        if loc in seen:
            continue
        seen.add(loc)
        field = str(loc[depth - 1]) if depth else None
        where = _path(list(loc))
        if err["type"] == "extra_forbidden" and depth:
            msg = f"{where}: unknown field {field!r} (the model reads: {', '.join(columns)})"
        elif err["type"] == "extra_forbidden":
            msg = f"{where}: unknown field {loc[-1]!r}"
        elif depth and err["type"] == "value_error":  # the input contract's own reason (pipelines.coerce)
            msg = f"{where}: {err['msg'].removeprefix('Value error, ')}"
        elif depth and field in columns:
            msg = f"{where}: expected {columns[field].expects}, got {_short(err.get('input'))}"
        elif err["type"] == "too_long" and loc and loc[0] in ROW_LISTS:
            got = (err.get("ctx") or {}).get("actual_length", "more")
            msg = f"{where}: {got} {loc[0]} is over the limit of {max_rows} per request"
        elif err["type"] == "json_invalid":
            msg = f"body: not valid JSON ({(err.get('ctx') or {}).get('error', err['msg'])})"
        else:
            msg = f"{where}: {err['msg']}"
        items.append(_item(["body", *loc], msg, err["type"], row, field))
    return ApiError(422, items[0]["msg"] if items else "invalid request", items[:MAX_DETAIL])


# -- scoring -------------------------------------------------------------------------------------
@dataclass
class Rows:
    """A request's rows as raw columns: `columns` one value per row, `shared` one for all rows."""

    columns: dict[str, list[Any]]
    n: int
    shared: dict[str, Any]

    def merged(self) -> dict[str, list[Any]]:
        """Every column with one value per row (what the general path's frame is built from)."""
        return self.columns | {column: [value] * self.n for column, value in self.shared.items()}


def candidate_rows(request: Any, items: list[tuple[str, str]]) -> Rows:
    """A rank request's candidates as rows: a field a candidate sets (even to null) is its own,
    any other is the context's. A field no candidate sets is given once, as shared; one every
    candidate sets needs no merge. `items`: the (field, column) pairs of the request models."""
    context = request.context.__dict__ if request.context is not None else {}
    candidates = request.candidates
    sets = [c.model_fields_set for c in candidates]
    values = [c.__dict__ for c in candidates]
    setters = Counter(itertools.chain.from_iterable(sets))  # how many candidates set each field
    data = {
        column: [v[f] for v in values]
        if setters[f] == len(candidates)
        else [v[f] if f in s else context.get(f) for v, s in zip(values, sets)]
        for f, column in items
        if setters[f]
    }
    return Rows(data, len(candidates), {column: context.get(f) for f, column in items if not setters[f]})


def _json(payload: dict[str, Any], loaded: LoadedModel) -> Response:
    body = msgspec.json.encode(payload)  # ~5x json.dumps on 100 candidates' scores; finite by now
    headers = {"X-Model-Name": loaded.name, "X-Model-Version": loaded.version}
    return Response(body, media_type="application/json", headers=headers)


class Service:
    """The request handlers' work, run in the scoring workers: validate, encode, score, respond."""

    def __init__(self, settings: ServingSettings, holder: ModelHolder, metrics: Metrics) -> None:
        self.settings = settings
        self.holder = holder
        self.metrics = metrics

    def _model(self) -> LoadedModel:
        loaded = self.holder.current  # read once: this request uses this model to the end
        if loaded is None:
            raise ApiError(503, "no model loaded yet (see /readyz)", headers={"Retry-After": "5"})
        return loaded

    def _validate(self, model: type[BaseModel], body: bytes, loaded: LoadedModel) -> Any:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc, loaded.models, self.settings.max_rows) from None

    def _score(
        self,
        loaded: LoadedModel,
        rows: Rows,
        endpoint: str,
        locate: Callable[[int, str | None], Loc],
    ) -> np.ndarray:
        """Score the rows; any rejected or unscoreable row fails the whole request (422).

        Rows that are certainly valid take the scorer's fast path (no data frame); any other
        request is scored through the general path, whose input contract names the rejects."""
        scores = loaded.scorer.score_rows(rows.columns, rows.n, rows.shared)
        if scores is None:
            scores = self._score_frame(loaded, rows.merged(), endpoint, locate)
        finite = np.isfinite(scores).all(axis=1)
        if not finite.all():  # every row was scored, so a score's position is its row
            bad = [int(i) for i in np.flatnonzero(~finite)[:MAX_DETAIL]]
            items = [
                _item(
                    ["body", *locate(i, None)],
                    f"{_path(locate(i, None))}: the model's scores are not finite "
                    "(a value is far outside the range it was trained on)",
                    "not_finite",
                    i,
                )
                for i in bad
            ]
            raise ApiError(422, items[0]["msg"], items)
        self.metrics.rows_scored.labels(endpoint).inc(len(scores))
        return scores

    def _score_frame(
        self, loaded: LoadedModel, data: dict[str, list[Any]], endpoint: str, locate: Callable[[int, str | None], Loc]
    ) -> np.ndarray:
        """The general path: a frame through the input contract, which names each reject."""
        try:
            scored = loaded.scorer.score(loaded.models.frame(data))
        except SchemaError as exc:  # cannot happen with a frame built from the spec; a 422 all the same
            raise ApiError(422, str(exc)) from None
        if scored.rejects.height:
            self.metrics.rows_rejected.labels(endpoint).inc(scored.rejects.height)
            items, seen = [], set()
            for row, reason in scored.rejects.select(ROW, REASON).head(MAX_DETAIL).iter_rows():
                column = loaded.models.by_feature.get(reason.split(":", 1)[0])
                loc = locate(int(row), column)
                if (key := (_path(loc), reason)) in seen:
                    continue  # a bad context value rejects every candidate: say it once
                seen.add(key)
                blamed_row = None if loc[0] == "context" else int(row)
                items.append(_item(["body", *loc], f"{_path(loc)}: {reason}", "rejected", blamed_row, column))
            raise ApiError(422, items[0]["msg"], items)
        return scored.scores

    def score(self, body: bytes) -> Response:
        loaded = self._model()
        request = self._validate(loaded.models.score, body, loaded)
        rows = request.rows
        tasks = loaded.scorer.tasks
        out: list[dict[str, float]] = []
        if rows:
            data = {column: [r.__dict__[f] for r in rows] for f, column in loaded.models.field_items()}
            located = Rows(data, len(rows), shared={})
            scores = self._score(loaded, located, "/v1/score", lambda i, col: ["rows", i, *([col] if col else [])])
            out = [dict(zip(tasks, s)) for s in scores.tolist()]
        return _json({"model": loaded.ref(), "tasks": tasks, "scores": out}, loaded)

    def rank(self, body: bytes) -> Response:
        loaded = self._model()
        request = self._validate(loaded.models.rank, body, loaded)
        tasks = loaded.scorer.tasks
        ranking: RankingConfig = request.ranking or self.settings.ranking
        try:
            ranking.check_tasks(tasks)
        except ValueError as exc:
            raise ApiError(422, str(exc), [_item(["body", "ranking", "weights"], str(exc), "unknown_task")]) from None
        candidates = request.candidates
        ranked: list[dict[str, Any]] = []
        if candidates:
            context_set = request.context.model_fields_set if request.context is not None else set()
            items = loaded.models.field_items()
            field_of = {column: f for f, column in items}

            def locate(i: int, column: str | None) -> Loc:
                if column is None:
                    return ["candidates", i]
                f = field_of[column]
                if f not in candidates[i].model_fields_set and f in context_set:
                    return ["context", column]
                return ["candidates", i, column]

            scores = self._score(loaded, candidate_rows(request, items), "/v1/rank", locate)
            with np.errstate(over="ignore", invalid="ignore"):  # extreme weights: reported just below
                combined = ranking_score(scores, tasks, ranking)
            if not np.isfinite(combined).all():
                msg = "ranking: these weights make the combined score infinite or NaN"
                raise ApiError(422, msg, [_item(["body", "ranking", "weights"], msg, "not_finite")])
            order = np.argsort(-combined, kind="stable")[: request.top_k]
            per_task = scores[order].tolist()
            ranked = [
                {"index": int(i), "score": float(combined[i]), "scores": dict(zip(tasks, s))}
                for i, s in zip(order.tolist(), per_task)
            ]
        payload = {"model": loaded.ref(), "tasks": tasks, "ranking": ranking.model_dump(), "candidates": ranked}
        return _json(payload, loaded)


# -- the app -------------------------------------------------------------------------------------
class _Workers:
    """At most `n` requests scored at once; the rest wait their turn.

    With 8 requests scored in parallel on 2 cores, each forward's ops and the GIL are contended
    and the server spent 5 ms of CPU per request against 1.5 ms for the same handler alone
    (benchmarks/serving_speed.py); queueing instead keeps the cores on useful work.

    One worker scores in the event loop's thread, inline: handing each request to a thread and
    back cost more than the scoring's own Python, and the two threads traded the GIL and the
    caches. Measured on 2 cores, closed loop, 8 clients, 100 candidates: about 2.4 against 3.2 ms
    of server CPU per request, 1.3x the requests/s (medians of alternating runs). The price: while a
    request is scored the loop does no I/O, so a probe or a new body waits for the requests
    already read (a few ms each for 100 candidates). More workers score in threads (FIFO), and
    probes are answered meanwhile.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.inline = n == 1  # the loop runs one callback at a time, so never two at once
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop, on first use

    def __str__(self) -> str:
        where = "in the event loop's thread" if self.inline else "in worker threads"
        return f"at most {self.n} request(s) at once ({where})"

    async def run(self, fn: Callable[[bytes], Response], body: bytes) -> Response:
        if self.inline:
            return fn(body)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.n)
        return await anyio.to_thread.run_sync(fn, body, limiter=self._limiter)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) anything over `limit` bytes before reading it when the length is
    declared, and as soon as it passes the limit when it is streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left (or took too long: protocol.TimedHttpProtocol)
        raise ApiError(CLIENT_CLOSED, "the client closed the connection before its request was complete") from None
    return b"".join(chunks)


def _auth(token: str | None) -> list[Any]:
    """The bearer-token dependency of /v1/* (none when no token is configured)."""
    if not token:
        return []
    expected = token.encode()
    bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")

    async def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return [Depends(check_token)]


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token (when the server has one)"},
    413: {"model": ErrorBody, "description": "request body over max_body_bytes"},
    422: {"model": ErrorBody, "description": "invalid request: the items name the row and the field"},
    503: {"model": ErrorBody, "description": "no model loaded yet"},
}


def _body(name: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi(app: FastAPI, schemas: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi


def settle_heap() -> None:
    """Collect, then freeze what survives (`gc.freeze`): the loaded model, its vocabularies and
    the libraries are ~430k objects, and every full collection walked them all, a 250 ms pause
    in whichever request triggered it. Frozen, they are skipped. Called once the model is in
    place and again after each swap (the old model is collected first)."""
    start = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.info("heap settled: %d objects frozen in %.0f ms", gc.get_freeze_count(), (time.perf_counter() - start) * 1e3)


def create_app(settings: ServingSettings, freeze_heap: bool = False) -> FastAPI:
    """Load the model (raises if it cannot be served, unless `wait_for_model`) and build the app.
    The alias poller starts and stops with the app's lifespan. `freeze_heap` (what `run` does,
    for a process that only serves): `settle_heap` after every load or swap of the model."""
    torch.set_num_threads(settings.torch_threads)
    metrics = Metrics()

    def on_swap(old: LoadedModel | None, new: LoadedModel) -> None:
        metrics.on_swap(old, new)
        if freeze_heap:
            settle_heap()

    holder = ModelHolder(settings, on_swap=on_swap, on_error=metrics.on_error)
    holder.load()
    service = Service(settings, holder, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.start()
        try:
            yield
        finally:
            holder.stop()

    startup = holder.current
    source = settings.model_uri or str(settings.model_dir)
    app = FastAPI(
        title="recsys-moe scoring",
        version="1",
        description=f"Multi-task scores and rankings from `{source}`"
        + (f" (spec `{startup.scorer.spec.name}`, tasks {startup.scorer.tasks})." if startup else ".")
        + " Request fields are the model's raw input columns; the schema shown is the model loaded at startup.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: see _offline_docs
        redoc_url=None,
    )
    _offline_docs(app)
    app.state.settings, app.state.holder, app.state.metrics = settings, holder, metrics
    if startup is not None:
        schemas = startup.models.json_schemas()
    else:
        rows = {"type": "array", "items": {"type": "object"}, "maxItems": settings.max_rows}
        schemas = {
            "ScoreRequest": {"type": "object", "properties": {"rows": rows}, "required": ["rows"]},
            "RankRequest": {"type": "object", "properties": {"candidates": rows}, "required": ["candidates"]},
        }
    app.openapi = _openapi(app, schemas)  # type: ignore[method-assign]
    auth = _auth(settings.token)
    scoring = _Workers(settings.scoring_workers)
    log.info("scoring %s, %d torch thread(s) each", scoring, settings.torch_threads)
    busy, cpus = settings.scoring_workers * settings.torch_threads, available_cpus()
    if busy > cpus:
        log.warning(
            "%d scoring worker(s) x %d torch thread(s) = %d threads for %d core(s): they will contend for them; "
            "fewer workers (--scoring-workers) or threads (--threads) usually answer faster",
            settings.scoring_workers,
            settings.torch_threads,
            busy,
            cpus,
        )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, exc.status, headers=exc.headers)

    @app.post(
        "/v1/score",
        dependencies=auth,
        openapi_extra=_body("ScoreRequest"),
        tags=["scoring"],
        responses={200: {"model": ScoreResponse}, **ERRORS},
    )
    async def score(request: Request) -> Response:
        """Per-task scores of each row, in request order. One bad row fails the request (422)."""
        return await scoring.run(service.score, await read_body(request, settings.max_body_bytes))

    @app.post(
        "/v1/rank",
        dependencies=auth,
        openapi_extra=_body("RankRequest"),
        tags=["scoring"],
        responses={200: {"model": RankResponse}, **ERRORS},
    )
    async def rank(request: Request) -> Response:
        """Candidates sorted by the combined ranking score, best first, each with its request index."""
        return await scoring.run(service.rank, await read_body(request, settings.max_body_bytes))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is up (it may still have no model: see /readyz)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], response_model=ReadyBody, responses={503: {"model": ReadyBody}})
    async def readyz() -> JSONResponse:
        """200 with the model being served, or 503 while none is loaded."""
        loaded = holder.current
        if loaded is None:
            return JSONResponse({"ready": False, "reason": f"no model loaded yet from {source}"}, 503)
        return JSONResponse({"ready": True, "model": loaded.describe()})

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    paths = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.add_middleware(MetricsMiddleware, metrics=metrics, paths=paths)
    return app


DOCS_ASSETS = "/docs-assets"


def _offline_docs(app: FastAPI) -> None:
    """/docs with Swagger UI's files served from the installed `swagger-ui-bundle` package, so
    the page works on a host with no internet (and loads nothing from a third party). Its spec
    validator badge, which calls validator.swagger.io, is off."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},
        )


def run(settings: ServingSettings) -> None:
    """Serve until interrupted (uvicorn, one process: the model and its poller live in it)."""
    import uvicorn

    app = create_app(settings, freeze_heap=True)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        http=timed_protocol(settings.request_timeout),
        timeout_keep_alive=settings.keep_alive,
    )


__all__ = ["ApiError", "create_app", "run"]
