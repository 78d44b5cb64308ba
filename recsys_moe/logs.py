"""Log setup for the CLI: our messages at INFO, third-party chatter (FBGEMM's per-table INFO
lines, torch.fx notices) kept at WARNING."""

from __future__ import annotations

import logging
import warnings


def setup(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("recsys_moe").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # MLflow logs a store error with its stack before raising it; the CLI reports the error in one
    # line (and `--verbose` re-raises it whole).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
