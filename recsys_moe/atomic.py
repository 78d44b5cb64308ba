"""Outputs that appear whole or not at all: every file and directory the platform writes goes
through here.

A file is written under a temporary name beside its destination (same directory, so same file
system) and renamed onto it; a directory is built beside its destination and swapped in with
renames. A reader, or a run resumed after a kill, sees the old output or the new one, never half
of one. What lands has the modes the process umask gives (0644 files and 0755 directories under
the usual 022), like any other file the user writes, so a shared-storage deployment reads them
across users: directories are made with `mkdir`, and a file a writer creates with a mode of its
own (safetensors writes 0600, as `tempfile.mkstemp` would) is set to the umask's mode.

Nothing here replaces what the platform did not write: a directory is replaced only when it is
empty or holds the file its writer always writes (a dataset's `manifest.json`, a bundle's
`model_config.json`, ...); anything else is an `OwnershipError`, and the user's files stay.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl
    import torch


class OwnershipError(ValueError):
    """A path the platform would replace or clean holds something it did not write."""


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies under it (after resolving links and `..`)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_owned(target: str | Path, owner: str) -> None:
    """Refuse `target` unless it is absent, an empty directory, or a directory holding `owner`
    (the file that what the platform writes there always contains)."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise OwnershipError(f"{target} exists and is not a directory recsys-moe wrote: choose another path")
    if (target / owner).is_file() or not any(target.iterdir()):
        return
    raise OwnershipError(
        f"{target} exists and was not written by recsys-moe (it has no {owner}): its files are left as they "
        "are; choose a new or empty directory"
    )


def umask() -> int:
    """The process umask, read without setting it (setting it races with other threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the only portable way, set and restore
    os.umask(mask)
    return mask


_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temp_path(target: Path) -> Path:
    """A fresh, unused name beside `target`: hidden, and naming the host and process writing it."""
    return target.with_name(f".{target.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_temps(target: str | Path) -> list[Path]:
    """Remove the temporary files and folders a killed writer of `target` left beside it: only
    names `temp_path` makes, only this host's, only of processes that are gone."""
    target = Path(target)
    removed = []
    for path in target.parent.glob(f".{target.name}.*.tmp"):
        match = _TEMP.match(path.name)
        if match and match["name"] == target.name and match["host"] == _HOST and not _alive(int(match["pid"])):
            _remove(path)
            removed.append(path)
    return removed


def sha256(paths: list[Path]) -> str:
    """One digest over the bytes of these files, in order: how a dataset and a batch result
    name what they were made from and what they hold."""
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path for a writer to create (a file, or a directory for writers that make
    one); renamed onto `target` when the block succeeds, removed when it fails. A block that
    creates nothing leaves `target` as it was.

        with atomic_path(out) as tmp:
            frame.write_parquet(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        yield tmp
        if not tmp.exists():
            return
        if tmp.is_file():  # on disk before it gets the name: a crash cannot leave an empty file
            os.chmod(tmp, 0o666 & ~umask())
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any, *, indent: int = 1, sort_keys: bool = False) -> Path:
    """JSON with `default=str` (paths, dates), so any of the platform's records serialise."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))


def write_parquet(frame: pl.DataFrame, path: str | Path, **options: Any) -> Path:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, **options)
    return Path(path)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return Path(path)


# -- directories -------------------------------------------------------------------------------
def staging_dir(target: str | Path, *, reclaim: bool = False) -> Path:
    """An empty directory beside `target` to build it in; `swap_in` then puts it in place.

    By default the name is unique, so two writers of one target never share a staging area.
    `reclaim=True` uses the fixed name `.<name>.tmp` and first removes what a killed earlier
    attempt left there: for outputs with one writer at a time (a run's checkpoints), so a kill
    leaves no orphaned copy of the model behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if reclaim:
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp = temp_path(target)
    tmp.mkdir()
    return tmp


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def swap_in(work: str | Path, target: str | Path) -> Path:
    """Replace directory `target` by `work` (a sibling) with renames only.

    Between the two renames only `.<name>.old` holds the previous version: `committed` finds it,
    so a kill at any moment leaves one whole version to read.
    """
    work, target = Path(work), Path(target)
    old = _old(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(work, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def publish_once(work: str | Path, target: str | Path, owner: str) -> Path:
    """Put `work` at `target` unless another writer already put a whole copy there, then drop
    `work`: for content that is the same whoever writes it (a cache keyed by an immutable id).
    Unlike `swap_in`, a copy in place is never moved away, so a reader of it never finds it gone.
    """
    work, target = Path(work), Path(target)
    try:
        os.rename(work, target)  # atomic; fails when target is a directory with files in it
    except OSError:
        if not (target / owner).is_file():
            raise
        shutil.rmtree(work, ignore_errors=True)  # the other writer won: same content
    return target


def committed(target: str | Path) -> Path | None:
    """`target`, or its previous version when a kill fell between `swap_in`'s two renames."""
    target = Path(target)
    old = _old(target)
    return target if target.exists() else old if old.exists() else None


@contextmanager
def building(target: str | Path, owner: str, *, reclaim: bool = False) -> Iterator[Path]:
    """A staging directory for `target`: swapped in when the block succeeds, removed when not.

    `owner` is the file the block always writes (e.g. `manifest.json`): an existing `target`
    that holds something else is refused before any work, and again before the swap.
    """
    check_owned(target, owner)
    work = staging_dir(target, reclaim=reclaim)
    try:
        yield work
        if not (work / owner).is_file():
            raise AssertionError(f"{target}: the writer did not write {owner}")
        check_owned(target, owner)  # again: something may have appeared there meanwhile
        swap_in(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
