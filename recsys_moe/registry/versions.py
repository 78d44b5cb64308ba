"""Registry verbs on a registered model: gate a version, roll back, list, resolve an alias.

Aliases are the contract with serving: `champion` is what `recsys-moe serve` and batch scoring
load; `challenger` marks the latest version that lost the gate. A champion version records the
version it replaced in its `previous_champion` tag, so rollback walks back one step at a time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import polars as pl

from recsys_moe.registry.package import download_bundle
from recsys_moe.registry.promotion import CHALLENGER, CHAMPION, PREVIOUS, Decision, PromotionConfig, evaluate_candidate
from recsys_moe.scoring import Scorer
from recsys_moe.tracking.store import tracking_uri as default_tracking_uri

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_MOE_CACHE", Path.home() / ".cache" / "recsys-moe")) / "models"


class RegistryError(RuntimeError):
    pass


class Registry:
    """A thin handle on MLflow's model registry for one tracking store (the project's default
    store unless `uri` names one)."""

    def __init__(self, uri: str | None = None) -> None:
        import mlflow

        self.uri: str = uri or default_tracking_uri()
        self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # -- lookups ---------------------------------------------------------------------------
    def alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def resolve(self, model_uri: str) -> tuple[str, str]:
        """`models:/NAME@alias`, `models:/NAME/3` or `models:/NAME` (the champion) → (name, version)."""
        if not model_uri.startswith("models:/"):
            raise RegistryError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        rest = model_uri.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
        elif "/" in rest:
            name, version = rest.split("/", 1)
            return name, version
        else:
            name, alias = rest, CHAMPION
        aliased = self.alias_version(name, alias)
        if aliased is None:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (see `recsys-moe models {name}`)")
        return name, aliased

    def bundle(self, name: str, version: str) -> Path:
        """The version's bundle, downloaded once into the cache, keyed by its logged model."""
        source = self.client.get_model_version(name, version).source  # models:/m-<uuid>: unique
        if not source:
            raise RegistryError(f"{name} v{version} has no source model in {self.uri}")
        key = source.removeprefix("models:/") if source.startswith("models:/m-") else f"{name}-{version}-{source}"
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
        return download_bundle(source, cache_dir() / safe, self.uri)

    def scorer(self, name: str, version: str) -> Scorer:
        return Scorer(self.bundle(name, version))

    # -- the gate --------------------------------------------------------------------------
    def gate(
        self, name: str, version: str, holdout: pl.DataFrame, config: PromotionConfig, force: bool = False
    ) -> Decision:
        """Compare `version` with the champion on `holdout`; move `champion` only if it wins."""
        champion = self.alias_version(name, CHAMPION)
        if champion == version:
            raise RegistryError(f"{name} version {version} is already the champion")
        candidate = self.scorer(name, version)
        champion_scorer = self.scorer(name, champion) if champion is not None else None
        decision = evaluate_candidate(candidate, champion_scorer, holdout, config, champion)
        if force and not decision.promote:
            decision.promote, decision.reason = True, f"forced (the gate said: {decision.reason})"
        self.record_decision(name, version, decision.tags())
        self.apply_decision(name, version, decision.promote, champion)
        log.info("%s v%s: %s — %s", name, version, decision.tags()["gate.decision"], decision.reason)
        return decision

    def record_decision(self, name: str, version: str, tags: dict[str, str]) -> None:
        """Write a gate decision (`Decision.tags()`) on the version, so the registry shows why."""
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    def apply_decision(self, name: str, version: str, promote: bool, champion: str | None = None) -> None:
        """Move the aliases for a decision: `champion` to `version` if it won (recording the
        version it replaced, `champion` by default the current one), else `challenger` to it."""
        if promote:
            previous = champion if champion is not None else self.alias_version(name, CHAMPION)
            self._make_champion(name, version, previous if previous != version else None)
            if self.alias_version(name, CHALLENGER) == version:
                self.client.delete_registered_model_alias(name, CHALLENGER)
        else:
            self.client.set_registered_model_alias(name, CHALLENGER, version)

    def _make_champion(self, name: str, version: str, previous: str | None) -> None:
        if previous is not None:
            self.client.set_model_version_tag(name, version, PREVIOUS, previous)
        self.client.set_registered_model_alias(name, CHAMPION, version)

    def rollback(self, name: str) -> tuple[str, str]:
        """Point `champion` back at the version the current champion replaced → (from, to)."""
        current = self.alias_version(name, CHAMPION)
        if current is None:
            raise RegistryError(f"registered model {name!r} has no champion to roll back")
        previous = self.client.get_model_version(name, current).tags.get(PREVIOUS)
        if previous is None:
            raise RegistryError(f"{name} v{current} is the first champion: there is nothing to roll back to")
        self.client.set_registered_model_alias(name, CHAMPION, previous)
        self.client.set_model_version_tag(name, current, "rolled_back", "true")
        log.info("%s: champion rolled back from v%s to v%s", name, current, previous)
        return current, previous

    # -- listing ---------------------------------------------------------------------------
    def versions(self, name: str) -> list[dict[str, Any]]:
        """One row per version, newest first: aliases, run, gate decision and holdout metrics."""
        rows = []
        for mv in self.client.search_model_versions(f"name='{name}'"):
            full = self.client.get_model_version(name, mv.version)
            tags = full.tags or {}
            rows.append(
                {
                    "version": int(mv.version),
                    "aliases": ",".join(getattr(full, "aliases", []) or []),
                    "run_id": mv.run_id,
                    "decision": tags.get("gate.decision", ""),
                    "metrics": {
                        k.removeprefix("gate.candidate."): float(v)
                        for k, v in tags.items()
                        if k.startswith("gate.candidate.")
                    },
                    "reason": tags.get("gate.reason", ""),
                }
            )
        return sorted(rows, key=lambda r: -r["version"])

    def find_versions(self, name: str, tags: dict[str, str]) -> list[str]:
        """Versions of `name` carrying every one of `tags` (key → exact value), oldest first.

        How a re-run finds the version an earlier run of the same job registered, instead of
        registering a duplicate (e.g. the retraining DAG tags versions with its logical date).
        """
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{name}'")
        except MlflowException:
            return []
        out = []
        for mv in found:
            have = mv.tags or self.client.get_model_version(name, mv.version).tags or {}
            if all(have.get(k) == v for k, v in tags.items()):
                out.append(str(mv.version))
        return sorted(out, key=int)

    def register(self, model_uri: str, name: str, tags: dict[str, str] | None = None) -> str:
        """A new version of `name` from a logged model URI → its version number."""
        import mlflow

        mlflow.set_registry_uri(self.uri)
        mlflow.set_tracking_uri(self.uri)
        mv = mlflow.register_model(model_uri, name, tags=tags)
        return str(mv.version)
