from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from safetensors.torch import load_file

from pipelines.manifest import Manifest
from recsys_moe.config import ModelConfig, load_config
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.tracking.store import ui_command
from recsys_moe.tracking.tracker import MlflowTracker
from recsys_moe.training.trainer import train


def test_run_is_written_to_a_temporary_store(synthetic_manifest: Manifest, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = MlflowTracker("test-exp", run_name="r1", uri=uri)
    config = load_config(None, ["train.epochs=2", "train.patience=5", f"train.checkpoint_dir={tmp_path / 'run'}"])
    result = train(synthetic_manifest, config, tracker=tracker, progress=False)
    tracker.close()

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "mmoe" and run.data.params["spec_hash"] == synthetic_manifest.spec_hash
    assert run.data.tags["dataset_digest"] == synthetic_manifest.digest
    assert len(client.get_metric_history(run.info.run_id, "val_click_auc")) == 2
    assert len(client.get_metric_history(run.info.run_id, "val_conversion_auc")) == 2
    assert abs(run.data.metrics["test_click_auc"] - result.test.metrics["click"]["auc"]) < 1e-9
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {synthetic_manifest.digest[:36]}

    artifacts = {a.path for top in ("model", "plots", "dataset") for a in client.list_artifacts(run.info.run_id, top)}
    assert {"model/model.safetensors", "model/model_config.json", "model/manifest.json", "dataset/manifest.json",
            "plots/validation_curves.png", "plots/gate_heatmap.png"} <= artifacts  # fmt: skip
    # Artifacts live beside the store, not in the working directory.
    assert (tmp_path / "mlartifacts").is_dir()

    # The logged weights are a state dict that loads into a fresh (plain EBC) model.
    local = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path / "dl"))
    model = MultiTaskRanker(synthetic_manifest, ModelConfig())
    model.load_state_dict(load_file(local))
    data = InMemoryDataset.from_split(synthetic_manifest, "test", model.sparse.keys, model.task_names)
    model.eval()
    with torch.no_grad():
        batch = data.batch(torch.arange(len(data)))
        from recsys_moe.training.metrics import auc

        got = auc(model.predict(batch.dense, batch.sparse)[:, 0], data.labels[:, 0])
    assert abs(got - result.test.metrics["click"]["auc"]) < 1e-6


def test_ui_command_names_the_store(tmp_path: Path) -> None:
    cmd = ui_command(f"sqlite:///{tmp_path}/mlruns.db")
    assert f"--backend-store-uri sqlite:///{tmp_path}/mlruns.db" in cmd and str(tmp_path / "mlartifacts") in cmd
