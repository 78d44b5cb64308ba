"""Nothing of the user's is lost, nothing scored silently wrong: the pipeline's paths, one input
contract for every scoring path, batch results that are all or nothing (issue 13, findings 1, 2
and 8, and bounded user files)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from recsys_moe import atomic
from recsys_moe.atomic import OwnershipError
from recsys_moe.features import load_spec
from recsys_moe.features.spec import SpecError, parse_spec
from recsys_moe.pipelines.build import build
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry.promotion import read_holdout
from recsys_moe.scoring import Scorer
from recsys_moe.scoring.batch import IncompleteResult, read_result, rejects_path, score_parquet
from tests.test_serving import serve

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


# -- finding 1: the pipeline deletes nothing it did not make, writes nothing into its input ------
def test_a_history_dir_not_made_by_the_pipeline_is_refused_not_emptied(synthetic_raw: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("x")
    with pytest.raises(OwnershipError, match="important|history_spec.json"):
        build(load_spec("synthetic_history"), synthetic_raw, tmp_path / "h", history_dir=victim, progress=False)
    assert (victim / "important.txt").read_text() == "x" and [p.name for p in victim.iterdir()] == ["important.txt"]


def test_history_is_kept_beside_the_dataset_and_the_raw_data_is_untouched(synthetic_raw: Path, tmp_path: Path) -> None:
    before = _files(synthetic_raw)
    out = tmp_path / "h"
    manifest = build(load_spec("synthetic_history"), synthetic_raw, out, progress=False)
    assert _files(synthetic_raw) == before  # nothing written into the input
    history = Path(manifest.events.history_dir)  # type: ignore[union-attr]
    assert history == tmp_path / "h.history" and (history / "history_spec.json").is_file()
    # A rebuild of our own history folder removes only its day partitions.
    (history / "notes.txt").write_text("mine")
    build(load_spec("synthetic_history"), synthetic_raw, out, rebuild_history=True, progress=False)
    assert (history / "notes.txt").read_text() == "mine"


def test_outputs_may_not_overlap_the_input_or_a_foreign_folder(synthetic_raw: Path, tmp_path: Path) -> None:
    spec = load_spec("synthetic")
    with pytest.raises(ValueError, match="overlap"):
        build(spec, synthetic_raw, synthetic_raw / "ds", progress=False)  # into the input
    with pytest.raises(ValueError, match="overlap"):
        build(spec, synthetic_raw, synthetic_raw.parent, progress=False)  # around the input: a rebuild would delete it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OwnershipError, match="manifest.json"):
        build(spec, synthetic_raw, mine, progress=False)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_spec_name_cannot_leave_its_folder(tmp_path: Path) -> None:
    raw = load_spec("synthetic_history").model_dump(mode="json")
    raw["name"] = "../../victim3"
    with pytest.raises(SpecError, match="name"):
        parse_spec(raw)
    spec_file = tmp_path / "specs" / "s.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text("extends: ../../../etc/passwd\nname: x\n")
    with pytest.raises(SpecError, match="not a file beside the spec"):
        load_spec(spec_file)


def test_user_files_are_bounded(tmp_path: Path) -> None:
    from recsys_moe.config import ConfigError, load_config
    from recsys_moe.features.expressions import ExpressionError, compile_expression

    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    bomb.write_text("\n".join(lines) + "\n")  # 2 KB on disk, 10 x 5^11 values once expanded
    start = time.perf_counter()
    with pytest.raises(SpecError, match="anchors expand"):
        load_spec(bomb)
    with pytest.raises(ConfigError, match="anchors expand"):
        load_config(bomb)
    assert time.perf_counter() - start < 5
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\n" + "#" * (2 * 1024 * 1024))
    with pytest.raises(SpecError, match="over the limit"):
        load_spec(huge)
    with pytest.raises(ExpressionError, match="over the limit"):
        compile_expression("+".join(["click"] * 3000))
    with pytest.raises(ExpressionError, match="nests deeper"):
        compile_expression("+".join(["x"] * 100))


def test_a_models_manifest_cannot_point_outside_its_bundle(logged_model, tmp_path: Path) -> None:
    """Found going through the same surface: a bundle arrives from the registry, and its manifest
    named the vocabulary files the scorer reads: `../../x.parquet` read a file elsewhere."""
    import json
    import shutil

    from recsys_moe.pipelines.manifest import ManifestError

    bundle = tmp_path / "bundle"
    shutil.copytree(logged_model[0].model_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, path in (("vocab", "../../elsewhere.parquet"), ("vocab", "/etc/passwd"), ("raw", "../x.parquet")):
        tampered = json.loads(json.dumps(manifest))
        if name == "vocab":
            tampered["vocab_files"][next(iter(tampered["vocab_files"]))] = path
        else:
            tampered["splits"]["test"]["raw"] = path
        (bundle / "manifest.json").write_text(json.dumps(tampered))
        with pytest.raises(ManifestError, match="not a path inside the dataset"):
            Scorer(bundle)


# -- finding 2: one input contract for every scoring path -----------------------------------------
@pytest.fixture(scope="module")
def holdout(synthetic_manifest: Manifest) -> pl.DataFrame:
    return read_holdout(synthetic_manifest.raw_path("test")).head(200)


def _as_float_ids(frame: pl.DataFrame) -> pl.DataFrame:
    """user_id and item_id as pandas writes an integer column with nulls: Float64."""
    return frame.with_columns(pl.col("user_id").cast(pl.Float64), pl.col("item_id").cast(pl.Float64))


def test_integral_float_ids_score_as_the_ids_they_hold(logged_model, holdout: pl.DataFrame) -> None:
    scorer = Scorer(logged_model[0].model_dir)
    as_ints, as_floats = scorer.score(holdout), scorer.score(_as_float_ids(holdout))
    assert as_floats.rejects.height == 0
    np.testing.assert_array_equal(as_floats.scores, as_ints.scores)  # "1632", never "1632.0" (an unseen id)


def _bad_rows(holdout: pl.DataFrame) -> tuple[pl.DataFrame, dict[int, str]]:
    """Rows 1-3 of the holdout spoiled in ways every path must refuse with the same reason."""
    frame = _as_float_ids(holdout.head(6))
    row = pl.int_range(pl.len())
    price = pl.col("price").cast(pl.Float64)
    frame = frame.with_columns(
        pl.when(row == 1).then(1.5).otherwise(pl.col("user_id")).alias("user_id"),
        pl.when(row == 2).then(float("nan")).when(row == 3).then(-3.0).otherwise(price).alias("price"),
    )
    return frame, {1: "user: 1.5 is not an id", 2: "price: not finite", 3: "price: -3.0 is below the minimum 0.0"}


def test_every_scoring_path_applies_one_contract(
    logged_model, holdout: pl.DataFrame, registry_store: str, tmp_path: Path
) -> None:
    import httpx

    from recsys_moe.registry.promotion import PromotionConfig, evaluate_candidate
    from recsys_moe.scoring.scorer import ROW
    from recsys_moe.serving.app import create_app
    from recsys_moe.serving.settings import ServingSettings

    result, model_uri = logged_model
    scorer = Scorer(result.model_dir)
    frame, expected = _bad_rows(holdout)
    # 1. the scorer
    scored = scorer.score(frame)
    assert dict(zip(scored.rejects[ROW].to_list(), scored.rejects["_reject_reason"].to_list())) == expected
    # 2. batch scoring: the same rejects, written out
    frame.write_parquet(tmp_path / "in.parquet")
    report = score_parquet(scorer, tmp_path / "in.parquet", tmp_path / "out.parquet", progress=False)
    rejects = pl.read_parquet(report.rejects)  # type: ignore[arg-type]
    assert dict(zip(rejects[ROW].to_list(), rejects["_reject_reason"].to_list())) == expected
    np.testing.assert_allclose(pl.read_parquet(report.output).select(scorer.tasks).to_numpy(), scored.scores)
    # 3. the pyfunc: the first reject, named
    mlflow.set_tracking_uri(registry_store)
    with pytest.raises(Exception, match="row 1: user: 1.5 is not an id"):
        mlflow.pyfunc.load_model(model_uri).predict(frame.to_pandas())
    good = frame[[0, 4, 5]]
    np.testing.assert_allclose(
        mlflow.pyfunc.load_model(model_uri).predict(good.to_pandas()).to_numpy(), scorer.score(good).scores, rtol=1e-6
    )
    # 4. HTTP: each bad row is a 422 naming the same problem; floats that are ids score like ints
    app = create_app(ServingSettings(model_dir=result.model_dir))
    rows = frame.select(scorer.input_columns).to_dicts()
    threads = torch.get_num_threads()  # the server sets torch's (process-wide) thread count
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:  # a real server, over a socket
        for i, reason in expected.items():
            if i == 2:
                continue  # JSON has no NaN: that row cannot be sent
            response = client.post("/v1/score", json={"rows": [rows[i]]})
            assert response.status_code == 422, response.text
            assert reason.split(": ", 1)[1].split(" (")[0] in response.json()["error"]
        response = client.post("/v1/score", json={"rows": [rows[0]]})
    torch.set_num_threads(threads)
    assert response.status_code == 200
    np.testing.assert_allclose(list(response.json()["scores"][0].values()), scored.scores[0], rtol=1e-6)
    # 5. the gate: the rows it compares on are the rows the scorer accepts
    decision = evaluate_candidate(scorer, None, _as_float_ids(holdout), PromotionConfig(min_rows=10))
    assert decision.rows == holdout.height


def _sized(holdout: pl.DataFrame, size: str) -> pl.DataFrame:
    """A request's few rows, or a batch chunk's many (validated as one planned query)."""
    from recsys_moe.scoring.scorer import LAZY_ROWS

    return holdout.head(3) if size == "request" else pl.concat([holdout] * -(-LAZY_ROWS // holdout.height))


@pytest.mark.parametrize("size", ["request", "chunk"])
def test_ids_in_the_wrong_shape_are_rejects_not_tracebacks(logged_model, holdout: pl.DataFrame, size: str) -> None:
    scorer = Scorer(logged_model[0].model_dir)
    rows = _sized(holdout, size)
    frame = rows.with_columns(
        pl.col("category").map_elements(lambda v: [v], return_dtype=pl.List(pl.String)),  # one id expected
    )
    reasons = scorer.score(frame).rejects["_reject_reason"].to_list()
    assert reasons == ["category: a list where one id is expected"] * rows.height
    frame = rows.with_columns(pl.col("interests").list.join(","))  # a list expected
    reasons = scorer.score(frame).rejects["_reject_reason"].to_list()
    assert reasons == ["interests: a string where a list of ids is expected"] * rows.height


@pytest.mark.parametrize("size", ["request", "chunk"])
def test_dense_values_of_any_column_type_are_rejects_not_tracebacks(
    logged_model, holdout: pl.DataFrame, size: str
) -> None:
    """A struct, list or binary column where a number is expected failed the whole batch inside
    the contract's cast; a categorical of numbers failed too. Now: rejects naming the feature,
    and numbers held as categorical text score as the numbers they are."""
    scorer = Scorer(logged_model[0].model_dir)
    rows = _sized(holdout, size)
    for bad, kind in [
        (pl.struct(pl.col("age"), pl.col("price")), "Struct"),
        (pl.concat_list(pl.col("age")), "List"),
        (pl.col("age").cast(pl.String).cast(pl.Binary), "Binary"),
    ]:
        scored = scorer.score(rows.with_columns(bad.alias("age")))
        assert scored.rejects.height == rows.height, kind
        assert all(
            r.startswith(f"age: {kind}") and r.endswith("values are not numbers")
            for r in scored.rejects["_reject_reason"]
        )
    as_text = scorer.score(rows.with_columns(pl.col("age").cast(pl.String).cast(pl.Categorical)))
    np.testing.assert_allclose(as_text.scores, scorer.score(rows).scores, rtol=0, atol=1e-6)


def test_a_damaged_input_file_is_a_one_line_error_and_leaves_nothing(
    logged_model, holdout: pl.DataFrame, tmp_path: Path
) -> None:
    from recsys_moe.cli import main

    source = tmp_path / "in.parquet"
    holdout.write_parquet(source)
    data = bytearray(source.read_bytes())
    for i in range(len(data) // 4, len(data) // 2, 7):  # the pages, not the footer
        data[i] ^= 0xFF
    source.write_bytes(data)
    out = tmp_path / "out" / "scores.parquet"
    args = ["score", "--model", str(logged_model[0].model_dir), "--input", str(source), "--output", str(out)]
    assert main(args) == 2
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# -- finding 8: batch results are all or nothing ----------------------------------------------------
def test_a_failed_rerun_keeps_the_earlier_result(logged_model, holdout: pl.DataFrame, tmp_path: Path) -> None:
    scorer = Scorer(logged_model[0].model_dir)
    frame, _ = _bad_rows(holdout)
    frame.write_parquet(tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    score_parquet(scorer, tmp_path / "in.parquet", out, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")}
    assert read_result(out)["rows_rejected"] == 3

    class Failing(Scorer):
        def score(self, frame: pl.DataFrame):  # type: ignore[no-untyped-def]
            raise RuntimeError("the model fell over")

    failing = Failing.__new__(Failing)
    failing.__dict__.update(scorer.__dict__)
    with pytest.raises(RuntimeError):
        score_parquet(failing, tmp_path / "in.parquet", out, progress=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")}
    assert after == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert read_result(out)["rows_rejected"] == 3  # still a whole, readable result


def test_an_output_not_written_by_scoring_is_refused(logged_model, holdout: pl.DataFrame, tmp_path: Path) -> None:
    holdout.write_parquet(tmp_path / "in.parquet")
    precious = tmp_path / "precious.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(precious)
    with pytest.raises(OwnershipError, match="not written by recsys-moe score"):
        score_parquet(Scorer(logged_model[0].model_dir), tmp_path / "in.parquet", precious, progress=False)
    assert pl.read_parquet(precious)["a"].to_list() == [1]


def test_a_result_never_replaces_its_input_or_part_of_another_result(
    logged_model, holdout: pl.DataFrame, tmp_path: Path
) -> None:
    """Found going through the same surface: scoring a result into itself (or a folder holding
    it), or writing over another result's rejects file, which left that result looking whole."""
    scorer = Scorer(logged_model[0].model_dir)
    frame, _ = _bad_rows(holdout)
    frame.write_parquet(tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    score_parquet(scorer, tmp_path / "in.parquet", out, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for source, target in ((out, out), (tmp_path, out), (tmp_path / "in.parquet", rejects_path(out))):
        with pytest.raises(OwnershipError):
            score_parquet(scorer, source, target, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert read_result(out)["rows_rejected"] == 3


def test_input_files_of_mixed_schemas_are_one_line_errors(logged_model, holdout: pl.DataFrame, tmp_path: Path) -> None:
    from recsys_moe.cli import main

    src = tmp_path / "in"
    src.mkdir()
    holdout.head(10).write_parquet(src / "a.parquet")
    holdout.head(10).with_columns(pl.col("age").cast(pl.String) + "y").write_parquet(src / "b.parquet")
    args = [
        "score",
        "--model",
        str(logged_model[0].model_dir),
        "--input",
        str(src),
        "--output",
        str(tmp_path / "o.parquet"),
    ]
    assert main(args) == 2
    holdout.head(10).with_columns(pl.col("age").cast(pl.Int32)).write_parquet(src / "b.parquet")  # widening is fine
    assert main(args) == 0 and read_result(tmp_path / "o.parquet")["rows_in"] == 20


def test_a_new_run_clears_every_temp_file_a_killed_run_left(
    logged_model, synthetic_manifest: Manifest, tmp_path: Path
) -> None:
    """A kill can land while the result, its rejects or its completion record is being written:
    the next run removes all three kinds of leftover, and leaves a live writer's alone."""
    rows = read_holdout(synthetic_manifest.raw_path("test")).head(50)
    rows.write_parquet(tmp_path / "in.parquet")
    out = tmp_path / "out" / "scores.parquet"
    out.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(dead.stdout)
    leftovers = [atomic_temp(path, gone) for path in (out, rejects_path(out), out.with_name(out.name + ".done.json"))]
    live = atomic_temp(out, os.getpid())
    for path in (*leftovers, live):
        path.write_text("half")
    score_parquet(Scorer(str(logged_model[0].model_dir)), tmp_path / "in.parquet", out, progress=False)
    assert not [p for p in leftovers if p.exists()] and live.exists()
    assert read_result(out)["rows_in"] == 50


def atomic_temp(target: Path, pid: int) -> Path:
    """The name `atomic.temp_path` gives a file process `pid` writes on this host."""
    name = atomic.temp_path(target).name
    host = name.rsplit(".", 2)[1].split("-")[0]
    return target.with_name(f".{target.name}.{host}-{pid}-0123abcd.tmp")


KILLS = 12  # enough to land both mid-scoring and after a commit (the window is measured first)
KILL_WORKER = """
import sys
from pathlib import Path
from recsys_moe.scoring import Scorer
from recsys_moe.scoring.batch import score_parquet
scorer = Scorer(sys.argv[1])
print("loaded", flush=True)
score_parquet(scorer, Path(sys.argv[2]), Path(sys.argv[3]), chunk_rows=64, progress=False)
"""


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_whole_result_or_none(
    logged_model, synthetic_manifest: Manifest, tmp_path: Path
) -> None:
    """Scoring two inputs in turn into one output, each run SIGKILLed at a random moment of its
    scoring: whatever is there is the complete, correct result of one of them (checked against
    reference runs), or no result at all."""
    model_dir = str(logged_model[0].model_dir)
    rows = read_holdout(synthetic_manifest.raw_path("test"))
    inputs = {"a": tmp_path / "a.parquet", "b": tmp_path / "b.parquet"}
    pl.concat([rows] * 8).write_parquet(inputs["a"])  # about 2 s of scoring in chunks of 64 rows
    pl.concat([rows.tail(900)] * 12).with_columns(pl.col("price").cast(pl.Float64) * 1.5).write_parquet(inputs["b"])
    reference, took = {}, []
    for key, path in inputs.items():
        start = time.perf_counter()
        score_parquet(Scorer(model_dir), path, tmp_path / f"ref_{key}.parquet", chunk_rows=64, progress=False)
        took.append(time.perf_counter() - start)
        record = read_result(tmp_path / f"ref_{key}.parquet")
        reference[record["input_sha256"]] = key, pl.read_parquet(tmp_path / f"ref_{key}.parquet")
    out, rng = tmp_path / "out" / "scores.parquet", random.Random(0)
    # The kill window is the worker's own time from "loaded" to its exit, measured here: a fresh
    # process pays one-time costs (first forward, reader threads) that the in-process runs above do not.
    for key, path in inputs.items():
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_WORKER, model_dir, str(path), str(tmp_path / f"w_{key}.parquet")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "loaded"
        start = time.perf_counter()
        assert proc.wait() == 0
        took.append(time.perf_counter() - start)
    seen = {"this run's": 0, "the previous run's": 0, "none": 0, "ran out": 0}
    strata = rng.sample(range(KILLS), KILLS)
    for attempt in range(KILLS):
        key = "ab"[attempt % 2]
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_WORKER, model_dir, str(inputs[key]), str(out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "loaded"
        # Stratified over the window (strata in random order): every part of the scoring is hit, and
        # now and then past its end, in an order that puts kills mid-scoring after a committed run.
        time.sleep((strata[attempt] + rng.random()) / KILLS * 1.2 * max(took))
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == 0:
            seen["ran out"] += 1
        try:
            record = read_result(out)
        except IncompleteResult:
            seen["none"] += 1
            continue
        source, expected = reference[record["input_sha256"]]
        seen["this run's" if source == key else "the previous run's"] += 1
        assert pl.read_parquet(out).equals(expected) and record["rows_in"] == expected.height
        assert rejects_path(out).exists() == (record["rows_rejected"] > 0)
    assert seen["this run's"] + seen["the previous run's"] + seen["none"] == KILLS
    # A run that is never killed still ends whole, and clears what the killed ones left.
    subprocess.run([sys.executable, "-c", KILL_WORKER, model_dir, str(inputs["a"]), str(out)], check=True)
    assert read_result(out)["rows_in"] == 8 * rows.height
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], list(out.parent.iterdir())
    print(f"kills: {seen}; scoring took {took}")
    # Kills landed both mid-scoring (the previous result stayed) and after a commit.
    assert seen["the previous run's"] > 0 and seen["this run's"] > 0, seen


@pytest.mark.parametrize("crash_at", range(4))
def test_a_crash_at_each_step_of_the_commit_leaves_no_mix(
    logged_model, holdout: pl.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    """The commit's steps (old record out, rejects, output, record in), each interrupted in turn:
    the earlier result or no result, never one that reads as whole but is not."""
    from recsys_moe.scoring import batch

    scorer = Scorer(logged_model[0].model_dir)
    first, _ = _bad_rows(holdout)  # 3 rejects
    first.write_parquet(tmp_path / "first.parquet")
    holdout.write_parquet(tmp_path / "second.parquet")  # no rejects
    out = tmp_path / "out.parquet"
    score_parquet(scorer, tmp_path / "first.parquet", out, progress=False)
    old = read_result(out)
    steps = {"n": 0}

    def counted(real):  # type: ignore[no-untyped-def]
        def step(*args, **kwargs):  # type: ignore[no-untyped-def]
            if steps["n"] == crash_at:
                raise KeyboardInterrupt("killed")
            steps["n"] += 1
            return real(*args, **kwargs)

        return step

    monkeypatch.setattr(batch.Path, "unlink", counted(Path.unlink))
    monkeypatch.setattr(batch.os, "replace", counted(os.replace))
    monkeypatch.setattr(batch.atomic, "write_json", counted(batch.atomic.write_json))
    with pytest.raises(KeyboardInterrupt):
        score_parquet(scorer, tmp_path / "second.parquet", out, progress=False)
    monkeypatch.undo()
    try:
        record = read_result(out)
    except IncompleteResult:
        return  # no result: allowed
    assert record == old  # only the earlier one can still read as whole


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_batch_writes_the_completion_record(logged_model, holdout: pl.DataFrame, tmp_path: Path) -> None:
    holdout.write_parquet(tmp_path / "in.parquet")
    out = tmp_path / "o.parquet"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_moe.cli",
            "score",
            "--model",
            str(logged_model[0].model_dir),
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    record = read_result(out)
    assert record["rows_in"] == holdout.height and record["model"].endswith("best")
