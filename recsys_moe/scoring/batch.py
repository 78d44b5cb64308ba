"""Batch scoring: parquet of raw rows in → parquet of keys + per-task scores + ranking score out.

Streams the input in chunks (memory stays bounded by the chunk size, not the file size) and
writes as it goes. Bad rows do not stop the job: they go to a rejects file with their row
number and the reason, and the counts reconcile (rows in = rows scored + rows rejected).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recsys_moe import atomic
from recsys_moe.pipelines.validate import REASON
from recsys_moe.scoring import RankingConfig, Scorer, ranking_score
from recsys_moe.scoring.scorer import ROW

log = logging.getLogger(__name__)

SCORE = "score"  # the combined ranking score column


@dataclass
class BatchReport:
    rows_in: int
    rows_out: int
    rows_rejected: int
    seconds: float
    output: Path
    rejects: Path | None

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else float("nan")


def input_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{path}: no parquet input")
    return files


def _chunks(files: list[Path], chunk_rows: int) -> Iterator[pl.DataFrame]:
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows):
            yield cast(pl.DataFrame, pl.from_arrow(batch))  # a record batch makes a frame


def rejects_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.rejects.parquet")


def score_parquet(
    scorer: Scorer,
    input_path: Path,
    output: Path,
    ranking: RankingConfig | None = None,
    chunk_rows: int = 65_536,
    progress: bool = True,
) -> BatchReport:
    """Score every row of `input_path` (a file or a directory of parquet files) into `output`."""
    ranking = ranking or RankingConfig()
    ranking.check_tasks(scorer.tasks)
    files = input_files(Path(input_path))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    output = Path(output)
    rejects_out = rejects_path(output)
    rejects_out.unlink(missing_ok=True)  # from an earlier run of the same output
    writer: pq.ParquetWriter | None = None
    reject_writer: pq.ParquetWriter | None = None
    rows_in = rows_out = rejected = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"score {Path(input_path).name}", unit="row", unit_scale=True, disable=not progress)
    # Both files appear whole when the job is done, or not at all (the rejects only if any).
    with atomic.atomic_path(output) as partial, atomic.atomic_path(rejects_out) as partial_rejects:
        try:
            for chunk in _chunks(files, chunk_rows):
                scored = scorer.score(chunk)
                # Keys identify rows; without key columns in the input, the row number does.
                ids = scored.keys if scored.keys.width else pl.DataFrame({ROW: scored.rows + rows_in})
                out = ids.with_columns(
                    [pl.Series(t, scored.scores[:, i]) for i, t in enumerate(scorer.tasks)]
                    + [pl.Series(SCORE, ranking_score(scored.scores, scorer.tasks, ranking))]
                )
                table = out.to_arrow()
                writer = writer or pq.ParquetWriter(partial, table.schema)
                writer.write_table(table)
                if scored.rejects.height:
                    bad = scored.rejects.with_columns(pl.col(ROW).cast(pl.Int64) + rows_in).to_arrow()
                    reject_writer = reject_writer or pq.ParquetWriter(partial_rejects, bad.schema)
                    reject_writer.write_table(bad.cast(reject_writer.schema))
                rows_in += chunk.height
                rows_out += out.height
                rejected += scored.rejects.height
                bar.update(chunk.height)
                bar.set_postfix(rejected=rejected)
            if writer is None:  # empty input: still write a valid, empty output
                schema = pa.schema([(t, pa.float32()) for t in scorer.tasks] + [(SCORE, pa.float64())])
                pq.write_table(schema.empty_table(), partial)
        finally:
            bar.close()
            for w in (writer, reject_writer):
                if w is not None:
                    w.close()
    assert rows_in == rows_out + rejected, (rows_in, rows_out, rejected)
    seconds = time.perf_counter() - start
    if rejected:
        top = pl.read_parquet(rejects_out, columns=[REASON])[REASON].head(3).to_list()
        log.warning("%d of %d rows rejected → %s (first: %s)", rejected, rows_in, rejects_out, top)
    return BatchReport(rows_in, rows_out, rejected, seconds, output, rejects_out if rejected else None)
