"""Checkpoints that cannot run code, a server that tells a client's fault from its own and does not
wait forever, a training run that ends cleanly on SIGTERM (issue 13, findings 6, 7 and 10)."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed.checkpoint as dcp

from recsys_moe.cli import main
from recsys_moe.distributed.checkpoint import CheckpointError, SafeReader, load_full
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.serving.app import create_app
from recsys_moe.serving.protocol import timed_protocol
from recsys_moe.serving.settings import ServingSettings
from recsys_moe.training import checkpoint
from tests.test_serving import serve


# -- finding 6: a checkpoint index is data, never code --------------------------------------------
class _RunsCode:
    """What an attacker pickles into `.metadata`: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


def _sharded_checkpoint(directory: Path) -> None:
    """A real (single-process) DCP checkpoint of two tensors."""
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(
            {"model.w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3)}, checkpoint_id=directory, no_dist=True
        )


def test_a_crafted_checkpoint_index_runs_no_code(tmp_path: Path) -> None:
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    _sharded_checkpoint(ckpt)
    assert torch.equal(load_full(ckpt)["model.w"], torch.arange(6.0).reshape(2, 3))  # the real one loads
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        load_full(ckpt)
    assert not marker.exists(), "unpickling the checkpoint index ran a command"


def test_a_checkpoint_index_is_checked_before_its_shards_are_read(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _sharded_checkpoint(ckpt)
    metadata = SafeReader(ckpt).read_metadata()
    for info in metadata.storage_data.values():  # a shard that points outside the checkpoint
        info.relative_path = "../../etc/passwd"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_full(ckpt)
    (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint index"):
        load_full(ckpt)
    (ckpt / ".metadata").write_bytes(b"\0" * (65 << 20))  # bounded: not read into memory whole
    with pytest.raises(CheckpointError, match="over the limit"):
        load_full(ckpt)


def test_resuming_a_corrupt_checkpoint_is_a_one_line_error(
    synthetic_manifest: Manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", str(synthetic_manifest.root), "--epochs", "1", "--checkpoint-dir", str(run)]
    args += ["--no-tracking", "--set", "train.max_steps_per_epoch=2"]
    assert main(args) == 0
    capsys.readouterr()
    weights = next((run / "last").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main([*args, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(run / "last") in err, err
    (run / "last" / checkpoint.PROGRESS).write_text("{not json")
    assert main([*args, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "progress.json" in err, err


# -- finding 7: the client's fault is a 4xx; half-sent requests do not hold a connection ---------
@pytest.fixture(scope="module")
def server(logged_model):  # type: ignore[no-untyped-def]
    """The endpoint with a 1 s request deadline, on a socket; → (host, port, base URL)."""
    threads = torch.get_num_threads()  # the server sets torch's (process-wide) thread count
    app = create_app(ServingSettings(model_dir=logged_model[0].model_dir, max_rows=50))
    with serve(app, http=timed_protocol(1.0), timeout_keep_alive=5) as url:
        yield "127.0.0.1", int(url.rsplit(":", 1)[1]), url
    torch.set_num_threads(threads)


def _status_counts(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    counts: dict[str, float] = {}
    for status, value in re.findall(r'^recsys_serving_requests_total\{[^}]*status="(\d+)"[^}]*\} (\S+)$', text, re.M):
        counts[status] = counts.get(status, 0) + float(value)
    return counts


def _closed_within(conn: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closes `conn` (reading whatever it sends), or None."""
    conn.settimeout(seconds)
    start = time.monotonic()
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_client_that_leaves_mid_body_is_not_a_server_error(server, caplog: pytest.LogCaptureFixture) -> None:
    host, port, base = server
    before = _status_counts(base)
    for _ in range(3):
        with socket.create_connection((host, port)) as conn:
            conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            conn.sendall(b"Content-Length: 5000\r\n\r\n" + b'{"rows": [{"user_id": "1"')
        time.sleep(0.2)
    time.sleep(0.5)
    after = _status_counts(base)
    assert after.get("500", 0) == before.get("500", 0), after
    assert after.get("499", 0) - before.get("499", 0) == 3, (before, after)
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text
    assert httpx.get(f"{base}/healthz").status_code == 200  # and it keeps serving


def test_a_half_sent_request_is_closed_after_the_deadline(server) -> None:
    host, port, base = server
    before = _status_counts(base)
    with socket.create_connection((host, port)) as conn:  # half the headers, then silence
        conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")
        waited = _closed_within(conn, 5)
        assert waited is not None and waited < 3, "a half-sent request line held the connection"
    with socket.create_connection((host, port)) as conn:  # the headers, half the body, silence
        conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        conn.sendall(b"Content-Length: 100\r\n\r\n{")
        waited = _closed_within(conn, 5)
        assert waited is not None and waited < 3, "a half-sent body held the connection"
    with socket.create_connection((host, port)) as conn:  # a whole request, then idle keep-alive
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in conn.recv(4096)
        waited = _closed_within(conn, 5)
        assert waited is not None and waited < 3, "an idle connection was kept past the deadline"
    after = _status_counts(base)
    assert after.get("500", 0) == before.get("500", 0)
    with httpx.Client(base_url=base) as client:  # a slow handler is not cut: only the request's arrival is timed
        assert client.get("/healthz").status_code == 200


# -- finding 10: SIGTERM ends a training run KILLED, and --resume ends it as if never stopped ----
EPOCHS = 6  # about 0.3 s each: the signal lands after epoch 1's checkpoint, well before the end


def _train_args(manifest: Manifest, run: Path) -> list[str]:
    return [
        "train",
        "--data",
        str(manifest.root),
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "256",
        "--checkpoint-dir",
        str(run),
        "--set",
        "model.num_experts=4",
        "--set",
        "train.patience=10",
    ]


def test_sigterm_ends_the_run_killed_and_resume_finishes_it(
    synthetic_manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    victim = tmp_path / "victim"
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_moe.cli", *_train_args(synthetic_manifest, victim)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = victim / "last" / checkpoint.PROGRESS
    deadline = time.monotonic() + 300
    while not (progress.exists() and json.loads(progress.read_text())["epoch"] >= 1):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted (stopped by signal SIGTERM)" in err, err[-3000:]
    stopped = checkpoint.read_progress(victim / "last")
    assert 1 <= stopped.epoch < EPOCHS, "the run was not stopped mid-way"
    client = MlflowClient(store)
    assert client.get_run(stopped.run_id).info.status == "KILLED"

    assert main([*_train_args(synthetic_manifest, victim), "--resume"]) == 0
    assert client.get_run(stopped.run_id).info.status == "FINISHED"
    reference = tmp_path / "reference"
    assert main(_train_args(synthetic_manifest, reference)) == 0
    resumed_progress = checkpoint.read_progress(victim / "last")
    assert resumed_progress.run_id == stopped.run_id  # one MLflow run, continued
    w_resumed, _ = checkpoint.load_weights(victim / "last")
    w_reference, _ = checkpoint.load_weights(reference / "last")
    for key, value in w_reference.items():
        torch.testing.assert_close(w_resumed[key], value, rtol=1e-5, atol=1e-6)
    reference_id = checkpoint.read_progress(reference / "last").run_id
    resumed_metrics = client.get_run(stopped.run_id).data.metrics
    reference_metrics = client.get_run(reference_id).data.metrics
    tests = {k: v for k, v in reference_metrics.items() if k.startswith("test_")}
    assert tests and {k: resumed_metrics[k] for k in tests} == pytest.approx(tests, abs=1e-6)
