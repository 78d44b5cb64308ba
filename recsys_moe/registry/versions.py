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

from recsys_moe.registry.lock import alias_lock
from recsys_moe.registry.package import download_bundle
from recsys_moe.registry.promotion import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    Decision,
    PromotionConfig,
    default_metrics,
    evaluate_candidate,
    require_baselines,
)
from recsys_moe.scoring import Scorer
from recsys_moe.tracking.store import tracking_uri as default_tracking_uri

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_MOE_CACHE", Path.home() / ".cache" / "recsys-moe")) / "models"


class RegistryError(RuntimeError):
    pass


class StaleDecisionError(RegistryError):
    """The champion moved between a gate's decision and its alias move: nothing was changed."""


def _v(version: str | None) -> str:
    return f"v{version}" if version is not None else "none"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def decision_markdown(tags: dict[str, str]) -> str:
    """A gate decision's tags as the markdown a model version page shows: the verdict, its
    reason, and each metric of the candidate beside the champion's."""
    lines = [f"**Gate: {tags.get('gate.decision', '?')}** — {tags.get('gate.reason', '')}", ""]
    champion = tags.get("gate.champion_version")
    rows = tags.get("gate.holdout_rows", "?")
    lines.append(f"Holdout rows compared: {rows}; champion: {f'v{champion}' if champion else 'none'}.")
    metrics = sorted(k.removeprefix("gate.candidate.") for k in tags if k.startswith("gate.candidate."))
    if metrics:
        lines += ["", "| metric | this version | champion |", "|---|---|---|"]
        lines += [f"| {m} | {tags[f'gate.candidate.{m}']} | {tags.get(f'gate.champion.{m}', '–')} |" for m in metrics]
    return "\n".join(lines)


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
        """Compare `version` with the champion on `holdout`; move `champion` only if it wins (or
        `force`, recorded as forced). A champion that cannot be loaded any more is replaced only
        with `force`: that is how the registry recovers from one."""
        champion = self.alias_version(name, CHAMPION)
        if champion == version:
            raise RegistryError(f"{name} version {version} is already the champion")
        candidate = self.scorer(name, version)
        champion_scorer = None
        if champion is not None:
            try:
                champion_scorer = self.scorer(name, champion)
            except Exception as exc:
                if not force:
                    raise RegistryError(
                        f"the champion {name} v{champion} cannot be loaded ({_one_line(exc)}): promote with --force "
                        "to replace it, or `recsys-moe rollback NAME --to VERSION`"
                    ) from None
                log.warning("champion %s v%s cannot be loaded (%s): forcing v%s", name, champion, exc, version)
        decision = evaluate_candidate(candidate, champion_scorer, holdout, config, champion)
        if decision.promote and config.beat_baselines_by is not None:
            found = self.client.get_model_version(name, version)
            run_id = found.run_id or found.tags.get("run_id")
            run_metrics = self.client.get_run(run_id).data.metrics if run_id else {}
            require_baselines(decision, run_metrics, config.metrics or default_metrics(candidate), config)
        if force and not decision.promote:
            decision.promote, decision.forced = True, True
            decision.reason = f"forced (the gate said: {decision.reason})"
        if champion is not None and champion_scorer is None:
            decision.reason = f"forced over an unloadable champion v{champion} ({decision.reason})"
        self.apply_decision(name, version, decision.promote, champion, decision.tags())
        log.info("%s v%s: %s — %s", name, version, decision.tags()["gate.decision"], decision.reason)
        return decision

    def record_decision(self, name: str, version: str, tags: dict[str, str]) -> None:
        """Write a gate decision (`Decision.tags()`) on the version, so the registry shows why:
        as tags (for tools) and as the version's description (what its UI page shows first)."""
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)
        self.client.update_model_version(name, version, description=decision_markdown(tags))

    def apply_decision(
        self,
        name: str,
        version: str,
        promote: bool,
        champion: str | None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Move the aliases for a decision made against `champion` (None: there was none):
        `champion` to `version` if it won, recording the version it replaced, else `challenger`
        to it. A compare-and-set under the model's lock: if `champion` moved since the decision,
        nothing changes and `StaleDecisionError` says so. `tags` (the decision) are written with it."""
        with alias_lock(self.uri, name):
            current = self.alias_version(name, CHAMPION)
            if promote and current != champion:
                raise StaleDecisionError(
                    f"{name}: the champion moved from {_v(champion)} to {_v(current)} since v{version} was gated "
                    "against it; gate it again"
                )
            if tags:
                self.record_decision(name, version, tags)
            if not promote:
                self.client.set_registered_model_alias(name, CHALLENGER, version)
                return
            if current is not None:
                self.client.set_model_version_tag(name, version, PREVIOUS, current)
            self.client.set_registered_model_alias(name, CHAMPION, version)
            if self.alias_version(name, CHALLENGER) == version:
                self.client.delete_registered_model_alias(name, CHALLENGER)

    def rollback(self, name: str, to: str | None = None) -> tuple[str, str]:
        """Point `champion` back at the version the current champion replaced, or at `to` →
        (from, to). Works when the current champion itself is broken (it is not loaded)."""
        from mlflow.exceptions import MlflowException

        with alias_lock(self.uri, name):
            current = self.alias_version(name, CHAMPION)
            if current is None:
                raise RegistryError(f"registered model {name!r} has no champion to roll back")
            if to is None:
                to = self.client.get_model_version(name, current).tags.get(PREVIOUS)
                if to is None:
                    raise RegistryError(
                        f"{name} v{current} is the first champion: there is nothing to roll back to "
                        "(`--to VERSION` names one, or promote another version with --force)"
                    )
            if to == current:
                raise RegistryError(f"{name} v{to} is already the champion")
            try:
                self.client.get_model_version(name, to)
            except MlflowException:
                raise RegistryError(f"{name} has no version {to} to roll back to") from None
            self.client.set_registered_model_alias(name, CHAMPION, to)
            self.client.set_model_version_tag(name, current, "rolled_back", "true")
        log.info("%s: champion rolled back from v%s to v%s", name, current, to)
        return current, to

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
