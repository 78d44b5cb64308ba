"""Sharded training on 2 gloo ranks (torchrun, CPU) against one process on the same data.

Tolerance: the two runs see the same rows but not in the same order (each rank shuffles its own
share) and start from different dense weights (the tables are built on the meta device, so the
dense layers draw other random numbers), so they are two training runs, not one run twice. Their
validation AUCs should differ no more than two single-process runs with different seeds do. On
this data (1,678 validation rows: 163 clicks, 22 conversions) seeds 0-2 after two epochs spread
by 0.011 (click) and 0.026 (conversion; 22 positives make it coarse), so the bound is 0.02 for
click and 0.04 for conversion, about 1.5x that spread. Separately, the cross-rank evaluation is
exact: the exported model, evaluated by the single-process code, reproduces the distributed
validation metrics of its epoch to 1e-6.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recsys_moe.config import load_config
from recsys_moe.model.embeddings import plan_tables
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun + gloo on Linux/macOS")

TOLERANCE = {"click": 0.02, "conversion": 0.04}
# Three sharding types at once: table-wise by default, one table data-parallel, the multi-hot
# feature's table column-wise (row_wise needs CUDA in TorchRec 1.8).
SHARDING = "train.sharding={'*': table_wise, packed_d4_sum: data_parallel, interests: column_wise}"


def _overrides(workdir: Path) -> list[str]:
    return [
        "train.epochs=2",
        "train.batch_size=256",
        "train.patience=10",
        "model.num_experts=4",
        "tracking.enabled=false",
        f"train.checkpoint_dir={workdir}",
        SHARDING,
    ]


@pytest.fixture(scope="module")
def runs(synthetic_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory):
    from recsys_moe.distributed.launch import launch
    from recsys_moe.training.trainer import train

    work = tmp_path_factory.mktemp("dist")
    config = load_config(None, _overrides(work / "two"))
    proc, result = launch(synthetic_manifest.root, config, 2, work / "two", capture=True)
    assert result is not None, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    single = train(synthetic_manifest, load_config(None, _overrides(work / "one")), progress=False)
    return proc, result, single


def test_two_ranks_reach_the_validation_metrics_of_one_process(runs) -> None:
    _, two, one = runs
    assert len(two.history) == len(one.history) == 2
    for task, tol in TOLERANCE.items():
        a, b = two.history[-1][f"val_{task}_auc"], one.history[-1][f"val_{task}_auc"]
        assert abs(a - b) <= tol, f"{task}: 2 ranks {a:.4f} vs 1 process {b:.4f} (tolerance {tol})"
    assert two.valid.metrics["click"]["auc"] > 0.6
    for task in TOLERANCE:  # the training loss fell on the ranks too
        assert two.history[-1][f"train_{task}_loss"] < two.history[0][f"train_{task}_loss"]


def test_the_plan_is_printed_and_returned(runs, synthetic_manifest: Manifest) -> None:
    proc, two, _ = runs
    assert "sharding plan (2 ranks, cpu)" in proc.stdout
    tables = {t.name for t in plan_tables(synthetic_manifest.sparse_features, 100_000).tables}
    plan = {row["table"]: row for row in two.sharding.plan}
    assert set(plan) == tables
    assert plan["packed_d4_sum"]["sharding"] == "data_parallel" and plan["packed_d4_sum"]["ranks"] == [0, 1]
    assert plan["packed_d8_mean"]["sharding"] == "column_wise"
    assert {plan[t]["sharding"] for t in tables - {"packed_d4_sum", "packed_d8_mean"}} == {"table_wise"}
    assert {r for row in plan.values() for r in row["ranks"]} == {0, 1}  # both ranks hold tables
    for row in two.sharding.plan:
        assert row["table"] in proc.stdout
    # TorchRec's TrainPipelineSparseDist found the sharded EBC and pipelines its input all-to-all.
    assert [m.split("module.")[-1] for m in two.sharding.pipelined_modules] == ["ranker.sparse.ebc"]


def test_the_export_loads_into_the_single_process_model_and_scorer(runs, synthetic_manifest: Manifest) -> None:
    from recsys_moe.config import ModelConfig
    from recsys_moe.data.loader import InMemoryDataset
    from recsys_moe.registry.promotion import read_holdout
    from recsys_moe.scoring import Scorer
    from recsys_moe.training import checkpoint
    from recsys_moe.training.evaluation import evaluate

    _, two, _ = runs
    weights, config = checkpoint.load_weights(two.model_dir)
    model = MultiTaskRanker(synthetic_manifest, ModelConfig.model_validate(config["model"]))
    model.load_state_dict(weights)  # strict: same keys and shapes as single-process training writes
    data = InMemoryDataset.from_split(synthetic_manifest, "valid", model.sparse.keys, model.task_names)
    ev = evaluate(model, data, 4096)
    best = two.history[two.best_epoch - 1]
    for task in model.task_names:  # exact all-gathered metrics, not a per-rank average
        assert ev.metrics[task]["auc"] == pytest.approx(best[f"val_{task}_auc"], abs=1e-6)
        assert ev.metrics[task]["logloss"] == pytest.approx(best[f"val_{task}_logloss"], abs=1e-6)
    scored = Scorer(two.model_dir).score(read_holdout(synthetic_manifest.raw_path("test")).head(50))
    assert scored.scores.shape == (50, 2) and torch.isfinite(torch.from_numpy(scored.scores)).all()


def test_sharding_constraints_resolve_tables_and_features(synthetic_manifest: Manifest) -> None:
    from recsys_moe.distributed.plan import constraints_for, make_plan

    tables = plan_tables(synthetic_manifest.sparse_features, 100_000).tables
    c = constraints_for(tables, {"*": "table_wise", "interests": "column_wise"})
    assert c["packed_d8_mean"].sharding_types == ["column_wise"]
    assert all(c[t.name].sharding_types == ["table_wise"] for t in tables if t.name != "packed_d8_mean")
    assert constraints_for(tables, {}) == {}
    with pytest.raises(ValueError, match="neither a table"):
        constraints_for(tables, {"nope": "table_wise"})
    with pytest.raises(ValueError, match="row_wise is not available on cpu"):
        make_plan(torch.nn.Module(), tables, {"*": "row_wise"}, torch.device("cpu"), 2)


def test_cli_trains_sharded_registers_it_and_points_a_single_process_resume_to_nproc(
    synthetic_manifest: Manifest, tmp_path: Path
) -> None:
    from recsys_moe.registry.versions import Registry

    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    run = [
        "train",
        "--data",
        str(synthetic_manifest.root),
        "--checkpoint-dir",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--set",
        "train.batch_size=512",
        "--set",
        "model.num_experts=4",
    ]
    cli = [sys.executable, "-m", "recsys_moe.cli"]
    done = subprocess.run(
        [*cli, *run, "--nproc", "2", "--register", "ranker"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert "trained on 2 rank(s)" in done.stdout and "test metrics" in done.stdout and "ranker" in done.stdout
    assert Registry(store).alias_version("ranker", "champion") == "1"  # the sharded model went through the gate

    done = subprocess.run([*cli, *run, "--resume"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2 and "resume it with --nproc N" in done.stderr and "Traceback" not in done.stderr


# --- checkpoints: a kill, a resume, a change of world size ------------------------------------

KILL_OVERRIDES = ["train.batch_size=128", "train.checkpoint_every=10"]


def _wait_mid_epoch(proc: subprocess.Popen, run_dir: Path, epoch: int, timeout: float = 600):
    """The progress of the first checkpoint in last/ from inside `epoch` (0-based)."""
    from recsys_moe.training import checkpoint

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        found = checkpoint.latest(run_dir)
        try:
            progress = checkpoint.read_progress(found) if found is not None else None
        except (OSError, json.JSONDecodeError, checkpoint.CheckpointError):  # swapped away while we read it
            progress = None
        if progress is not None and progress.epoch == epoch and progress.step > 0:
            return progress
        time.sleep(0.01)
    raise AssertionError(f"no mid-epoch checkpoint in epoch {epoch + 1} before the run ended (rc {proc.poll()})")


def _kill_when_mid_epoch(proc: subprocess.Popen, run_dir: Path, epoch: int, timeout: float = 600):
    """SIGKILL torchrun and every rank as soon as last/ holds a checkpoint from inside `epoch`."""
    import psutil

    progress = _wait_mid_epoch(proc, run_dir, epoch, timeout)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.kill()
    proc.wait()
    return progress


@pytest.fixture(scope="module")
def killed(synthetic_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 2-rank run; the same run killed mid-epoch 2; the kill's checkpoint resumed
    on 2 ranks and, from a copy, on 1 rank."""
    import shutil

    from recsys_moe.distributed.launch import launch, start

    work = tmp_path_factory.mktemp("kill")
    config = load_config(None, _overrides(work / "ref") + KILL_OVERRIDES)
    proc, reference = launch(synthetic_manifest.root, config, 2, work / "ref", capture=True)
    assert reference is not None, proc.stderr[-6000:]

    victim = start(synthetic_manifest.root, config, 2, work / "killed", capture=True)
    at_kill = _kill_when_mid_epoch(victim, work / "killed", epoch=1)
    assert not (work / "killed" / "distributed_result.json").exists()
    shutil.copytree(work / "killed", work / "to_one")
    out = {}
    for name, nproc in (("killed", 2), ("to_one", 1)):
        proc, out[name] = launch(synthetic_manifest.root, config, nproc, work / name, capture=True, resume=True)
        assert out[name] is not None, f"resume on {nproc} ranks failed:\n{proc.stderr[-6000:]}"
        assert f"at epoch 2, step {at_kill.step}" in proc.stdout
    return reference, at_kill, out["killed"], out["to_one"], work


def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(killed) -> None:
    reference, at_kill, resumed, _, _ = killed
    assert 0 < at_kill.step < 67  # 8,644 rows / 128 per step: inside epoch 2
    assert resumed.best_epoch == reference.best_epoch
    # Same data position, RNG and optimizer states: the run continues as if never stopped.
    for epoch in (0, 1):
        for key in ("val_click_auc", "val_conversion_auc", "val_click_logloss", "train_click_loss"):
            assert resumed.history[epoch][key] == pytest.approx(reference.history[epoch][key], abs=1e-5)
    for task in TOLERANCE:
        assert resumed.test.metrics[task]["auc"] == pytest.approx(reference.test.metrics[task]["auc"], abs=1e-5)


def test_a_two_rank_checkpoint_resumes_on_one_rank(killed) -> None:
    reference, _, _, on_one, _ = killed
    assert on_one.sharding.world_size == 1 and len(on_one.history) == 2
    # Epoch 1 was trained on 2 ranks before the kill: carried over from the checkpoint as it was.
    timing = "train_samples_per_s"
    assert {k: v for k, v in on_one.history[0].items() if k != timing} == pytest.approx(
        {k: v for k, v in reference.history[0].items() if k != timing}
    )
    # Epoch 2 finished on one rank over another split of the rows: a different but equally good run.
    for task, tol in TOLERANCE.items():
        a, b = on_one.history[1][f"val_{task}_auc"], reference.history[1][f"val_{task}_auc"]
        assert abs(a - b) <= tol, f"{task}: resumed on 1 rank {a:.4f} vs 2 ranks {b:.4f}"


# --- two nodes on one host, by the README's own commands --------------------------------------


def _readme_node_commands() -> tuple[list[str], list[str]]:
    """The two `recsys-moe train` lines of the README's "Several nodes" section: start, resume."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Several nodes", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("recsys-moe train")]
    assert len(lines) == 2 and lines[1] == lines[0] + " --resume", lines
    return shlex.split(lines[0])[1:], shlex.split(lines[1])[1:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_nodes(
    args: list[str], data: Path, run_dir: Path, logs: Path, tag: str, second_node_extra: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """Both nodes' launchers, on this host: the README's line with its placeholders filled in and
    the small model's settings (those of `killed`'s reference run) added."""
    port = _free_port()
    fill = {"/shared/data/synthetic": str(data), "/shared/runs/mmoe": str(run_dir), "HOST:29400": f"127.0.0.1:{port}"}
    line = [fill.get(a, a) for a in args]
    assert set(fill.values()) <= set(line), line
    settings = [o for o in _overrides(run_dir) + KILL_OVERRIDES if not o.startswith("train.checkpoint_dir")]
    command = [sys.executable, "-m", "recsys_moe.cli", *line, *(x for o in settings for x in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for i, extra in enumerate(((), second_node_extra)):
        with (logs / f"{tag}-node{i}.log").open("w") as out:  # the child keeps its own descriptor
            nodes.append(
                subprocess.Popen([*command, *extra], stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=logs)
            )
    return nodes


def _processes_of(run_dir: Path) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(run_dir) in cmdline and p.pid != os.getpid():
            found.append(cmdline[:200])
    return found


@pytest.mark.slow
def test_two_nodes_train_as_one_node_and_resume_after_a_killed_launcher(
    killed, synthetic_manifest: Manifest, tmp_path: Path
) -> None:
    """Two launchers (`--nnodes 2`, one rank each, c10d rendezvous on 127.0.0.1) run the README's
    command. One launcher is SIGKILLed mid-epoch 2: its node's agent and rank stop with it, the other
    node fails. The README's resume line on both nodes then ends exactly where one node with two
    ranks ends uninterrupted (`killed`'s reference): same plan, same checkpoints, same result."""
    from recsys_moe.training.loop import TrainResult

    reference, *_, work = killed
    start, resume = _readme_node_commands()
    run_dir = tmp_path / "run"
    nodes = _start_nodes(start, synthetic_manifest.root, run_dir, tmp_path, "start")
    at_kill = _wait_mid_epoch(nodes[1], run_dir, epoch=1)
    nodes[1].kill()  # SIGKILL node 2's launcher, and only it
    assert nodes[1].wait(timeout=60) == -9
    assert nodes[0].wait(timeout=300) != 0, "node 1 trained on without node 2"
    deadline = time.monotonic() + 60
    while _processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_of(run_dir), f"processes outlived their launcher: {_processes_of(run_dir)}"

    nodes = _start_nodes(resume, synthetic_manifest.root, run_dir, tmp_path, "resume")
    assert [n.wait(timeout=600) for n in nodes] == [0, 0], [
        (tmp_path / f"resume-node{i}.log").read_text()[-4000:] for i in range(2)
    ]
    logs = [(tmp_path / f"resume-node{i}.log").read_text() for i in range(2)]
    assert sum("test metrics" in log for log in logs) == 1  # the node that ran rank 0 reports
    assert sum("rank 0 ran on another node" in log for log in logs) == 1
    assert any(f"at epoch 2, step {at_kill.step}" in log for log in logs)
    raw = json.loads((run_dir / "distributed_result.json").read_text())
    raw.pop("launch_token")
    resumed = TrainResult.from_json(raw)
    assert json.loads((run_dir / "sharding_plan.json").read_text()) == json.loads(
        (work / "ref" / "sharding_plan.json").read_text()
    )
    assert resumed.best_epoch == reference.best_epoch and len(resumed.history) == len(reference.history)
    for ours, theirs in zip(resumed.history, reference.history):
        for key in ("val_click_auc", "val_conversion_auc", "val_click_logloss", "train_click_loss"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
    for task in TOLERANCE:
        assert resumed.test.metrics[task]["auc"] == pytest.approx(reference.test.metrics[task]["auc"], abs=1e-5)


def test_nodes_started_with_different_settings_stop_before_training(
    synthetic_manifest: Manifest, tmp_path: Path
) -> None:
    """Both launchers write the run's config file; each hands its own ranks its own config, so a
    node started with other settings is caught by the ranks, not trained with the other's file."""
    start, _ = _readme_node_commands()
    run_dir = tmp_path / "run"
    nodes = _start_nodes(start, synthetic_manifest.root, run_dir, tmp_path, "mixed", ("--set", "train.epochs=3"))
    assert [n.wait(timeout=300) for n in nodes] != [0, 0]
    logs = "".join((tmp_path / f"mixed-node{i}.log").read_text() for i in range(2))
    assert "started with different run configs or datasets" in logs
    assert not (run_dir / "last").exists()


def test_multi_node_usage_errors_are_one_line(synthetic_manifest: Manifest, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "recsys_moe.cli", "train", "--data", str(synthetic_manifest.root)]
    cli += ["--checkpoint-dir", str(tmp_path / "run"), "--no-tracking"]
    for extra, says in (
        (["--nnodes", "2"], "--nnodes needs --nproc"),
        (["--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", "localhost"], "expected HOST:PORT"),
        (["--nnodes", "0", "--nproc", "1", "--rdzv-endpoint", "127.0.0.1:29400"], "--nnodes must be at least 1"),
    ):
        done = subprocess.run([*cli, *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_checkpoints_reshard_between_world_sizes_without_loss(killed, synthetic_manifest: Manifest) -> None:
    """2 ranks → 1 → 2: every table, both optimizers' states and the dense weights come back bit
    for bit (DCP reads each rank's pieces of the tables under the new plan)."""
    from recsys_moe.distributed.checkpoint import load_full
    from recsys_moe.distributed.launch import CONFIG_FILE

    *_, work = killed
    worker = Path(__file__).with_name("reshard_worker.py")
    src = work / "ref"
    hops = [(src / "last", work / "one", 1), (work / "one" / "last", work / "two_again", 2)]
    for source, target, nproc in hops:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(worker),
            str(synthetic_manifest.root),
            str(src / CONFIG_FILE),
            str(source),
            str(target),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-6000:]
    original = load_full(src / "last")
    assert any(k.startswith("embedding_optim.") for k in original) and any(
        k.startswith("dense_optim.") for k in original
    )
    for _, target, nproc in hops:
        moved = load_full(target / "last")
        assert json.loads((target / "last" / "progress.json").read_text())["world_size"] == nproc
        for key, value in original.items():
            if key.startswith("rng."):
                continue
            assert torch.equal(moved[key], value), f"{key} changed on the way to {nproc} rank(s)"


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    from recsys_moe.atomic import staging_dir, swap_in
    from recsys_moe.training import checkpoint

    last = tmp_path / "last"
    for value in ("old", "new"):
        tmp = staging_dir(last, reclaim=True)
        (tmp / ".metadata").write_text(value)
        (tmp / "progress.json").write_text(json.dumps({"run_id": value}))
        if value == "old":
            swap_in(tmp, last)
    # Killed while writing `new`: last/ is still the old checkpoint.
    assert checkpoint.read_progress(checkpoint.latest(tmp_path)).run_id == "old"
    # Killed between swap_in's two renames: only .last.old exists, and it is found.
    last.rename(tmp_path / ".last.old")
    assert checkpoint.read_progress(checkpoint.latest(tmp_path)).run_id == "old"
