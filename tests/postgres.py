"""A throwaway PostgreSQL server for tests: `initdb` + `pg_ctl` from the machine's own PostgreSQL
binaries (Debian's `postgresql-NN` package), on a free port of 127.0.0.1, trust authentication,
removed afterwards. Tests that need it skip cleanly where the binaries are absent.

PostgreSQL refuses to run as root; under root (CI containers) the server runs as the `postgres`
system user, with its data directory outside pytest's root-only temp folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def bin_dir() -> Path | None:
    """Where `initdb` and `pg_ctl` are: on PATH, or the newest /usr/lib/postgresql/<N>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return Path(candidates[-1]).parent if candidates else None


def unavailable() -> str | None:
    """Why no server can be started here (for `pytest.skip`), or None."""
    if bin_dir() is None:
        return "needs PostgreSQL's server binaries (initdb, pg_ctl): e.g. Debian's postgresql-15"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str = "postgres"
    host: str = "127.0.0.1"

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        """A SQLAlchemy URL (psycopg 3), as MLflow and Airflow take it."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create `name` and return its URL."""
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_server_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", "postgres", "--", *args]


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """Start a server, yield how to reach it, stop it (immediately) and remove its files."""
    binaries = bin_dir()
    assert binaries is not None, unavailable()
    root = Path(tempfile.mkdtemp(prefix="recsys-moe-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chmod(root, 0o700)
    port = free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    try:
        subprocess.run(
            _as_server_user(
                [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]
            ),
            **run,
        )
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        subprocess.run(
            _as_server_user(
                [str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
            ),
            **run,
        )
        server = Postgres(port)
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waits for the socket; also wait until it accepts logins
            try:
                import psycopg

                psycopg.connect(host=server.host, port=port, user=server.user, dbname="postgres").close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        raise RuntimeError(f"PostgreSQL failed to start: {exc.stderr}\n{log}") from exc
    finally:
        subprocess.run(
            _as_server_user([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)
