"""One alias move at a time per registered model, across processes.

MLflow's registry sets an alias with no compare-and-set, so two promoters that both read
`champion = v1` would both win and both record v1 as the version they replaced. Every move of
`champion` (gate, rollback) takes this lock, re-reads the alias inside it and fails if it changed
since the decision (`versions.StaleDecisionError`).

Where the lock lives depends on the store: a file lock beside an SQLite database or a file store
(processes on one host or one shared file system), an advisory lock in PostgreSQL. A tracking
*server* (http/https) offers no lock of its own: set `RECSYS_MOE_LOCK_URI` to a database every
promoter can reach (the server's own PostgreSQL, `postgresql+psycopg://...`) or a path on shared
storage, and moves through the server are locked there. Without it they are still re-checked,
but two promoters racing within the same instant can both pass (a warning says so).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class LockTimeoutError(RuntimeError):
    """The alias lock could not be taken: held by another process too long, or its store unreachable."""


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _store_path(uri: str) -> Path | None:
    """The file or folder of a local store, or None for a database or server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" not in uri:
        return Path(uri)
    return None


@contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeoutError(f"another process holds {path} for over {timeout:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _postgres_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    import sqlalchemy

    if uri.startswith("postgresql://"):  # SQLAlchemy's default driver is psycopg2; the pinned one is psycopg 3
        uri = "postgresql+psycopg://" + uri.removeprefix("postgresql://")
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    key = int(_key(f"recsys-moe/{name}"), 16) % (2**63)
    try:
        conn = engine.connect()
        conn.execute(sqlalchemy.text(f"SET lock_timeout = '{int(timeout * 1000)}ms'"))
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
    except sqlalchemy.exc.DBAPIError as exc:  # unreachable, refused, or held past the timeout
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise LockTimeoutError(f"cannot take the alias lock of {name!r} in {where}: {reason}") from None
    try:
        yield
    finally:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.close()
        engine.dispose()


LOCK_URI_ENV = "RECSYS_MOE_LOCK_URI"


@contextmanager
def alias_lock(uri: str, name: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold the lock on `name`'s aliases in the store at `uri` (or where `RECSYS_MOE_LOCK_URI` says)."""
    if uri.startswith(("http://", "https://", "databricks")) and os.environ.get(LOCK_URI_ENV):
        uri = os.environ[LOCK_URI_ENV]
    path = _store_path(uri)
    if path is not None:
        folder = path if path.is_dir() else path.parent
        with _file_lock(folder / f".{path.name}.{_key(name)}.lock", timeout):
            yield
    elif uri.startswith(("postgresql://", "postgresql+")):
        with _postgres_lock(uri, name, timeout):
            yield
    else:
        log.warning(
            "%s: alias moves are re-checked but not locked across processes; set %s to lock them", uri, LOCK_URI_ENV
        )
        yield
