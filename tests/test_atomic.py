"""recsys_moe.atomic: outputs appear whole or not at all, with the modes the umask gives, for
every writer of the platform (datasets, event logs, bundles, checkpoints, scores)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest

from recsys_moe import atomic


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, set[int]]:
    """The permission bits of every file and every directory under (and including) root."""
    out: dict[str, set[int]] = {"files": set(), "dirs": {stat.S_IMODE(root.stat().st_mode)}}
    for path in root.rglob("*"):
        out["dirs" if path.is_dir() else "files"].add(stat.S_IMODE(path.stat().st_mode))
    return out


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_modes_follow_the_umask(tmp_path: Path, mask: int, file_mode: int, dir_mode: int) -> None:
    with umask(mask):
        written = [
            atomic.write_json(tmp_path / "a.json", {"x": 1}),
            atomic.write_text(tmp_path / "b.txt", "hi"),
            atomic.write_parquet(pl.DataFrame({"x": [1]}), tmp_path / "c.parquet"),
        ]
        with atomic.building(tmp_path / "d", "inner.txt") as work:
            (work / "inner.txt").write_text("x")
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {file_mode}
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "d" / "inner.txt").stat().st_mode) == file_mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = atomic.write_text(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_block_that_writes_nothing_leaves_the_target(tmp_path: Path) -> None:
    with atomic.atomic_path(tmp_path / "maybe.parquet"):
        pass
    assert not (tmp_path / "maybe.parquet").exists() and not list(tmp_path.iterdir())


def test_a_directory_is_swapped_in_whole(tmp_path: Path) -> None:
    target = tmp_path / "dataset"
    with atomic.building(target, "v") as work:
        (work / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic.building(target, "v") as work:
        (work / "v").write_text("2")
        raise RuntimeError("killed mid-build")
    assert (target / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["dataset"]
    with atomic.building(target, "v") as work:
        (work / "v").write_text("3")
    assert (target / "v").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["dataset"]
    # A kill between swap_in's two renames leaves only the previous version, which is found.
    target.rename(tmp_path / ".dataset.old")
    assert atomic.committed(target) == tmp_path / ".dataset.old"


def test_reclaim_reuses_the_staging_area_a_kill_left(tmp_path: Path) -> None:
    left = atomic.staging_dir(tmp_path / "last", reclaim=True)
    (left / "big.bin").write_bytes(b"x" * 1000)  # a checkpoint half-written when the run was killed
    again = atomic.staging_dir(tmp_path / "last", reclaim=True)
    assert again == left and not list(again.iterdir())
    assert atomic.staging_dir(tmp_path / "last") != atomic.staging_dir(tmp_path / "last")  # unique by default


def test_platform_outputs_are_readable_by_the_group_and_others(
    synthetic_raw: Path, synthetic_manifest, tmp_path: Path
) -> None:
    """Under the usual 022: event partitions, datasets, bundles, checkpoints and scores are
    0644 files in 0755 directories, so another user on shared storage reads them."""
    from recsys_moe.config import load_config
    from recsys_moe.features import load_spec
    from recsys_moe.pipelines.build import build
    from recsys_moe.pipelines.sources import synthetic
    from recsys_moe.scoring import Scorer
    from recsys_moe.scoring.batch import score_parquet
    from recsys_moe.training.trainer import train

    with umask(0o022):
        raw = tmp_path / "raw"
        synthetic.write(
            synthetic.generate(
                synthetic.SyntheticConfig(n_users=50, n_items=40, n_impressions=3_000, n_days=5, seed=1)
            ),
            raw,
        )
        manifest = build(load_spec("synthetic"), raw, tmp_path / "ds", progress=False)
        config = load_config(
            None, ["train.epochs=1", "model.num_experts=2", f"train.checkpoint_dir={tmp_path / 'run'}"]
        )
        result = train(manifest, config, progress=False)
        score_parquet(
            Scorer(result.model_dir), manifest.raw_path("test"), tmp_path / "scores" / "s.parquet", progress=False
        )
    for root in (raw, tmp_path / "ds", tmp_path / "run", tmp_path / "scores"):
        assert modes(root) == {"files": {0o644}, "dirs": {0o755}}, root


def test_a_cache_entry_is_published_once_and_never_moved_under_a_reader(tmp_path: Path) -> None:
    """Two processes downloading the same model: the first whole copy stays in place. The gate
    of the other failed reading a vocabulary the second writer's swap had moved away (CI)."""
    target = tmp_path / "cache" / "m-1"
    first, second = atomic.staging_dir(target), atomic.staging_dir(target)
    for work, text in ((first, "first"), (second, "second")):
        (work / "MLmodel").write_text(text)
        (work / "vocab.parquet").write_text(text)
    atomic.publish_once(first, target, "MLmodel")
    reader = open(target / "vocab.parquet")  # noqa: SIM115 (held open across the second publish)
    atomic.publish_once(second, target, "MLmodel")
    assert reader.read() == "first" and (target / "vocab.parquet").read_text() == "first"
    reader.close()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m-1"]  # the loser's copy is gone
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    work = atomic.staging_dir(foreign)
    (work / "MLmodel").write_text("x")
    with pytest.raises(OSError):
        atomic.publish_once(work, foreign, "MLmodel")  # not a copy of ours: never replaced
    assert (foreign / "notes.txt").read_text() == "mine"
