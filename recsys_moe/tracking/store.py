"""Where runs are tracked: an embedded local store unless MLFLOW_TRACKING_URI says otherwise.

The default is a SQLite backend (`./mlruns.db`) with artifacts in `./mlartifacts`, so a newcomer
gets a real MLflow store and registry with no server to start.
"""

from __future__ import annotations

import os
from pathlib import Path

DB_NAME = "mlruns.db"
ARTIFACTS_NAME = "mlartifacts"


def default_tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / DB_NAME}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        artifacts = db.parent / ARTIFACTS_NAME
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {artifacts} --port 5000"
    return f"open {uri} in a browser (MLflow tracking server)"
