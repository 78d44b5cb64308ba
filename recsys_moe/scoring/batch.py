"""Batch scoring: parquet of raw rows in → parquet of keys + per-task scores + ranking score out.

Streams the input in chunks (memory stays bounded by the chunk size, not the file size). Bad rows
do not stop the job: they go to a rejects file with their row number and the reason, and the
counts reconcile (rows in = rows scored + rows rejected).

A result is three files that belong together: the output, its rejects (when any row was
rejected) and a completion record `<output>.done.json` (row counts, the model, digests of the
input and of both files). They are written under temporary names and put in place last, the
record after the rest: a result without its record is not a result (`read_result` says so), so a
kill leaves the previous complete result or none, never a mix a reader would take for one. An
existing output is replaced only when an earlier run of this function wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from recsys_moe import atomic
from recsys_moe.allocator import retain_freed_memory
from recsys_moe.pipelines.validate import REASON, SchemaError
from recsys_moe.scoring import RankingConfig, Scorer, ranking_score
from recsys_moe.scoring.scorer import ROW
from recsys_moe.threads import ThreadGovernor

log = logging.getLogger(__name__)

SCORE = "score"  # the combined ranking score column
MARK = b"recsys_moe.scores"  # parquet metadata key of every file this module writes
KIND = "recsys-moe scores"  # the completion record's kind


class IncompleteResult(ValueError):  # noqa: N818 (a state, not a failure of the call)
    """An output that is not a finished result: no completion record, or files that do not match it."""


@dataclass
class BatchReport:
    rows_in: int
    rows_out: int
    rows_rejected: int
    seconds: float
    output: Path
    rejects: Path | None
    record: Path | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else float("nan")


def input_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{path}: no parquet input")
    return files


def _input_schema(files: list[Path]) -> pa.Schema:
    """One schema for every input file (numeric types widened, columns missing in a file as
    nulls), or a SchemaError that names the files and the column they disagree on."""
    schemas = []
    for f in files:
        try:
            schemas.append(pq.read_schema(f))
        except (pa.ArrowException, OSError) as exc:
            raise SchemaError(f"{f}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowException, TypeError) as exc:
        for field in {name for s in schemas for name in s.names}:
            types = {f.name: str(s.field(field).type) for f, s in zip(files, schemas) if field in s.names}
            if len(set(types.values())) > 1:
                shown = ", ".join(f"{k}: {v}" for k, v in list(types.items())[:4])
                raise SchemaError(f"the input files disagree on the type of column {field!r} ({shown})") from None
        raise SchemaError(f"the input files have schemas that cannot be read as one ({exc})") from None


def _chunks(files: list[Path], chunk_rows: int) -> Iterator[pl.DataFrame]:
    """The input's rows in order, `chunk_rows` at a time, every file read with one schema.

    Polars' streaming engine reads ahead in its own threads while the caller scores a chunk,
    with bounded buffers (benchmarks/serving_speed.py measures peak RSS on a large input); it
    decodes parquet several times faster than pyarrow's batches converted to polars."""
    schema = pl.from_arrow(_input_schema(files).empty_table()).schema  # type: ignore[union-attr]
    for f in files:
        present = pl.read_parquet_schema(f)
        columns = [
            pl.col(name).cast(dtype) if name in present else pl.lit(None, dtype).alias(name)
            for name, dtype in schema.items()
        ]
        try:
            yield from pl.scan_parquet(f).select(columns).collect_batches(chunk_size=chunk_rows)
        except pl.exceptions.PolarsError as exc:  # a damaged file: its footer read, its pages not
            raise SchemaError(f"{f}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def record_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.done.json")


def rejects_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.rejects.parquet")


def _ours(path: Path) -> bool:
    """Whether `path` is a parquet file this module wrote (its metadata carries MARK)."""
    try:
        return MARK in (pq.read_schema(path).metadata or {})
    except (pa.ArrowException, OSError):
        return False


def _check_replaceable(output: Path) -> None:
    for path in (output, rejects_path(output)):
        if path.exists() and not _ours(path):
            raise atomic.OwnershipError(
                f"{path} exists and was not written by recsys-moe score: it is left as it is; choose another --output"
            )
    record = record_path(output)
    if record.exists():
        try:
            kind = json.loads(record.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != KIND:
            raise atomic.OwnershipError(
                f"{record} exists and is not a recsys-moe completion record: choose another --output"
            )


def _check_apart(files: list[Path], output: Path) -> None:
    """The result must not replace its own input, nor another result's rejects file (which
    would leave that result looking whole with a file not its own)."""
    paths = {output, rejects_path(output), record_path(output)}
    for file in files:
        if any(p.exists() and p.samefile(file) for p in paths):
            raise atomic.OwnershipError(f"--output {output} would replace the input {file}: choose another path")
    if output.name.endswith(".rejects.parquet"):
        owner = output.with_name(output.name.removesuffix(".rejects.parquet") + ".parquet")
        if record_path(owner).exists():
            raise atomic.OwnershipError(f"{output} is the rejects file of the result {owner}: choose another --output")


def score_parquet(
    scorer: Scorer,
    input_path: Path,
    output: Path,
    ranking: RankingConfig | None = None,
    chunk_rows: int = 65_536,
    progress: bool = True,
    model: str | None = None,
) -> BatchReport:
    """Score every row of `input_path` (a file or a directory of parquet files) into `output`,
    its rejects beside it and the completion record last. `model` names the model in the record
    (default: the scorer's bundle directory)."""
    ranking = ranking or RankingConfig()
    ranking.check_tasks(scorer.tasks)
    retain_freed_memory()  # every chunk's tensors reuse the last chunk's pages (recsys_moe/allocator.py)
    files = input_files(Path(input_path))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(output)
    _check_apart(files, output)
    for path in (output, rejects_path(output), record_path(output)):
        atomic.clear_stale_temps(path)  # what a killed run left, its record's temp file included
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    input_digest = atomic.sha256(files)
    partial, partial_rejects = atomic.temp_path(output), atomic.temp_path(rejects_path(output))
    mark = {MARK: json.dumps({"model": model or str(scorer.directory), "input": str(input_path)}).encode()}
    writer: pq.ParquetWriter | None = None
    reject_writer: pq.ParquetWriter | None = None
    rows_in = rows_out = rejected = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"score {Path(input_path).name}", unit="row", unit_scale=True, disable=not progress)
    threads_before = torch.get_num_threads()
    threads = ThreadGovernor()  # what the host can give, re-checked between chunks
    try:
        try:
            # One chunk's output is written in a thread while the next is scored (pyarrow releases
            # the GIL); at most one write is in flight, and leaving the block waits for it.
            with ThreadPoolExecutor(1, thread_name_prefix="score-writer") as background:
                written: Future[None] | None = None
                for chunk in _chunks(files, chunk_rows):
                    threads.tick()
                    scored = scorer.score(chunk)
                    # Keys identify rows; without key columns in the input, the row number does.
                    ids = scored.keys if scored.keys.width else pl.DataFrame({ROW: scored.rows + rows_in})
                    out = ids.with_columns(
                        [pl.Series(t, scored.scores[:, i]) for i, t in enumerate(scorer.tasks)]
                        + [pl.Series(SCORE, ranking_score(scored.scores, scorer.tasks, ranking))]
                    )
                    table = out.to_arrow()
                    # Dictionary pages only for the keys: scores are all distinct, and trying a
                    # dictionary on them first costs more than the rest of the write.
                    writer = writer or pq.ParquetWriter(
                        partial, table.schema.with_metadata(mark), use_dictionary=[c for c in ids.columns if c != ROW]
                    )
                    if written is not None:
                        written.result()  # raises what the previous write raised
                    written = background.submit(writer.write_table, table.cast(writer.schema))
                    if scored.rejects.height:
                        bad = scored.rejects.with_columns(pl.col(ROW).cast(pl.Int64) + rows_in).to_arrow()
                        reject_writer = reject_writer or pq.ParquetWriter(
                            partial_rejects, bad.schema.with_metadata(mark)
                        )
                        reject_writer.write_table(bad.cast(reject_writer.schema))
                    rows_in += chunk.height
                    rows_out += out.height
                    rejected += scored.rejects.height
                    bar.update(chunk.height)
                    bar.set_postfix(rejected=rejected)
                if written is not None:
                    written.result()
                if writer is None:  # empty input: still write a valid, empty output
                    schema = pa.schema([(t, pa.float32()) for t in scorer.tasks] + [(SCORE, pa.float64())])
                    pq.write_table(schema.with_metadata(mark).empty_table(), partial)
        finally:
            bar.close()
            torch.set_num_threads(threads_before)  # the caller's setting again
            for w in (writer, reject_writer):
                if w is not None:
                    w.close()
        if rows_in != rows_out + rejected:
            raise AssertionError(f"batch scoring lost rows: {rows_in} in, {rows_out} out, {rejected} rejected")
        record = {
            "kind": KIND,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model or str(scorer.directory),
            "run_id": scorer.config.get("run_id"),
            "tasks": scorer.tasks,
            "input": str(input_path),
            "input_sha256": input_digest,
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rows_rejected": rejected,
            "output": output.name,
            "output_sha256": atomic.sha256([partial]),
            "rejects": rejects_path(output).name if rejected else None,
            "rejects_sha256": atomic.sha256([partial_rejects]) if rejected else None,
        }
        _commit(output, partial, partial_rejects if rejected else None, record)
    finally:
        partial.unlink(missing_ok=True)
        partial_rejects.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    rejects_out = rejects_path(output)
    if rejected:
        top = pl.read_parquet(rejects_out, columns=[REASON])[REASON].head(3).to_list()
        log.warning("%d of %d rows rejected → %s (first: %s)", rejected, rows_in, rejects_out, top)
    return BatchReport(
        rows_in, rows_out, rejected, seconds, output, rejects_out if rejected else None, record_path(output)
    )


def _commit(output: Path, partial: Path, partial_rejects: Path | None, record: dict[str, Any]) -> None:
    """Put a finished result in place. The old record goes first: from then until the new one
    is written, the files there are not a result, whatever a kill leaves of them."""
    for path in (partial, *([partial_rejects] if partial_rejects else [])):
        os.chmod(path, 0o666 & ~atomic.umask())
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    record_path(output).unlink(missing_ok=True)
    if partial_rejects is not None:
        os.replace(partial_rejects, rejects_path(output))
    else:
        rejects_path(output).unlink(missing_ok=True)  # the earlier result's: this one has none
    os.replace(partial, output)
    atomic.write_json(record_path(output), record)


def remove_result(output: Path) -> None:
    """Remove a result this module wrote at `output` (record first), and nothing else."""
    output = Path(output)
    _check_replaceable(output)
    record_path(output).unlink(missing_ok=True)
    rejects_path(output).unlink(missing_ok=True)
    output.unlink(missing_ok=True)


def read_result(output: Path) -> dict[str, Any]:
    """The completion record of a finished result at `output`, after checking that the files
    there are the ones it describes; `IncompleteResult` otherwise."""
    output = Path(output)
    record_file = record_path(output)
    if not record_file.is_file():
        raise IncompleteResult(f"{output}: not a finished result (no {record_file.name})")
    record = json.loads(record_file.read_text())
    if record.get("kind") != KIND:
        raise IncompleteResult(f"{record_file}: not a recsys-moe completion record")
    if not output.is_file() or atomic.sha256([output]) != record["output_sha256"]:
        raise IncompleteResult(f"{output}: does not match its completion record")
    rejects = rejects_path(output)
    if record["rejects_sha256"] is None:
        if rejects.exists():
            raise IncompleteResult(f"{rejects}: the result has no rejects, yet this file is there")
    elif not rejects.is_file() or atomic.sha256([rejects]) != record["rejects_sha256"]:
        raise IncompleteResult(f"{rejects}: does not match its completion record")
    return dict(record)
