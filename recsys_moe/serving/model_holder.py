"""The model a server is serving right now, and the thread that follows a registry alias.

A swap loads and warms the new Scorer completely, then replaces the reference in one assignment
under a lock. Requests read the reference once when they start and use that model to the end,
so a request in flight during a swap finishes on the old model and none fails: there is no
moment with a half-loaded model or no model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_moe.scoring import Scorer
from recsys_moe.serving.schemas import RequestModels, request_models
from recsys_moe.serving.settings import ModelUri, ServingSettings

if TYPE_CHECKING:
    from recsys_moe.registry.versions import Registry

log = logging.getLogger(__name__)

LOCAL_VERSION = "local"  # the version reported for a model served from a bundle directory


class ModelUnavailableError(RuntimeError):
    """No model can be loaded (yet): the alias does not exist, or the source is broken."""


@dataclass(frozen=True)
class LoadedModel:
    """A loaded, warmed Scorer with the request models of its spec: everything a request needs."""

    scorer: Scorer
    name: str
    version: str
    run_id: str | None
    models: RequestModels
    loaded_at: float = field(default_factory=time.time)

    def ref(self) -> dict[str, str | None]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}

    def describe(self) -> dict[str, Any]:
        return {**self.ref(), **self.scorer.describe(), "loaded_at": self.loaded_at}


def warm_up(loaded: LoadedModel) -> None:
    """Score one plausible row, so the first real request after a load or a swap does not pay for
    lazy initialisation (polars plans, torch kernels)."""
    row: dict[str, Any] = {}
    spec = {f.name: f for f in loaded.scorer.spec.features}
    for column in loaded.models.columns:
        features = [spec[name] for name in column.features]
        if column.kind == "dense":
            low = max((f.min for f in features if f.min is not None), default=0.0)
            high = min((f.max for f in features if f.max is not None), default=float("inf"))
            row[column.name] = min(max(0.0, low), high)
        elif column.kind == "multi_hot":
            row[column.name] = ["warm-up"]
        else:
            row[column.name] = "warm-up"
    columns = {column: [value] * 4 for column, value in row.items()}
    try:
        loaded.scorer.score(loaded.models.frame(columns))
        loaded.scorer.score_rows(columns, 4)  # the fast path: builds its vocabulary lookups now
    except Exception:  # a failed warm-up costs latency, not correctness: the model loaded
        log.warning("warm-up of %s v%s failed", loaded.name, loaded.version, exc_info=True)


class ModelHolder:
    """Holds the current `LoadedModel`; with an alias source, polls the registry and swaps.

    `on_swap(old, new)` is called after every change of model (the initial load has old=None);
    `on_error(exc)` after a failed poll or load (the current model keeps serving)."""

    def __init__(
        self,
        settings: ServingSettings,
        on_swap: Callable[[LoadedModel | None, LoadedModel], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.source: ModelUri | None = settings.source
        self._registry = registry
        self._on_swap = on_swap
        self._on_error = on_error
        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()  # guards the one assignment that swaps models
        self._refresh_lock = threading.Lock()  # one check/load at a time (poller vs. refresh())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        """The model to use for one whole request: read it once, at the request's start."""
        return self._current

    @property
    def follows_alias(self) -> bool:
        return self.source is not None and self.source.alias is not None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from recsys_moe.registry.versions import Registry

            self._registry = Registry(self.settings.tracking_uri)
        return self._registry

    # -- loading -----------------------------------------------------------------------------
    def _build(self, scorer: Scorer, name: str, version: str, run_id: str | None) -> LoadedModel:
        self.settings.ranking.check_tasks(scorer.tasks)  # the default ranking must fit every model served
        loaded = LoadedModel(scorer, name, version, run_id, request_models(scorer.spec, self.settings.max_rows))
        warm_up(loaded)
        return loaded

    def _load_directory(self, directory: Path) -> LoadedModel:
        scorer = Scorer(directory)
        name = self.settings.model_name or (directory.parent.name if directory.name == "best" else directory.name)
        run_id = scorer.config.get("run_id")
        return self._build(scorer, name, LOCAL_VERSION, str(run_id) if run_id else None)

    def _load_version(self, name: str, version: str) -> LoadedModel:
        scorer = Scorer(self.registry.bundle(name, version))
        run_id = self.registry.client.get_model_version(name, version).run_id or scorer.config.get("run_id")
        return self._build(scorer, name, version, run_id)

    def _swap(self, new: LoadedModel) -> None:
        with self._swap_lock:
            old, self._current = self._current, new
        if old is None:
            log.info("serving %s v%s (run %s, spec %s)", new.name, new.version, new.run_id, new.scorer.spec.name)
        else:
            log.info("swapped %s v%s → %s v%s (run %s)", old.name, old.version, new.name, new.version, new.run_id)
        if self._on_swap is not None:
            self._on_swap(old, new)

    def load(self) -> None:
        """The startup load. Raises when no model can be served, unless `wait_for_model` is set
        (then the poller keeps trying and /readyz says 503 meanwhile)."""
        if self.settings.model_dir is not None:
            self._swap(self._load_directory(Path(self.settings.model_dir)))
            return
        assert self.source is not None
        if self.source.version is not None:
            self._swap(self._load_version(self.source.name, self.source.version))
            return
        try:
            if not self.refresh():
                raise ModelUnavailableError(
                    f"registered model {self.source.name!r} has no alias {self.source.alias!r} "
                    f"in {self.registry.uri} (set it, or start with wait_for_model)"
                )
        except Exception as exc:
            if not self.settings.wait_for_model:
                raise
            log.warning("no model yet (%s); polling every %ss", exc, self.settings.poll_seconds)

    def refresh(self) -> bool:
        """Check the alias now; load and swap when it points at another version. True on a swap.
        Raises when the check or the load fails (the current model is kept)."""
        if not self.follows_alias:
            return False
        assert self.source is not None and self.source.alias is not None
        with self._refresh_lock:
            version = self.registry.alias_version(self.source.name, self.source.alias)
            current = self._current
            if version is None:
                if current is not None:
                    log.warning(
                        "%s@%s no longer exists; still serving v%s",
                        self.source.name,
                        self.source.alias,
                        current.version,
                    )
                return False
            if current is not None and current.version == version:
                return False
            log.info("%s@%s is now v%s: loading", self.source.name, self.source.alias, version)
            self._swap(self._load_version(self.source.name, version))
            return True

    # -- following ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start polling the alias every `poll_seconds` (no-op for a directory or a pinned version)."""
        if not self.follows_alias or self.settings.poll_seconds <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # keep serving the current model; try again next poll
                log.error("model poll failed: %s", exc, exc_info=True)
                if self._on_error is not None:
                    self._on_error(exc)
