"""Files that appear whole or not at all: written beside their destination, then renamed in, so a
reader (or a run resumed after a kill) never sees half a parquet file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import polars as pl


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
