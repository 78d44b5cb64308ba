from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from safetensors.torch import load_file

from recsys_moe.config import ModelConfig, load_config
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.registry.package import bundle_path, log_model
from recsys_moe.registry.promotion import read_holdout
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
    # GAUC (the spec groups by user_id) per epoch, and the baselines beside the model's metrics.
    assert len(client.get_metric_history(run.info.run_id, "val_click_gauc")) == 2
    assert abs(run.data.metrics["test_click_gauc"] - result.test.metrics["click"]["gauc"]) < 1e-9
    assert [b["name"] for b in result.baselines] == ["key_mean", "linear"]
    for b in result.baselines:
        for split in ("valid", "test"):
            for task in ("click", "conversion"):
                for metric in ("auc", "gauc", "logloss"):
                    key = f"baseline_{b['name']}_{split}_{task}_{metric}"
                    assert abs(run.data.metrics[key] - b[split][task][metric]) < 1e-9, key
        assert run.data.tags[f"baseline.{b['name']}"] == b["detail"]
    assert 0.5 < result.baselines[1]["test"]["click"]["auc"] < 1  # the linear model learned something

    artifacts = {a.path for top in ("plots", "dataset") for a in client.list_artifacts(run.info.run_id, top)}
    assert {"dataset/manifest.json", "plots/validation_curves.png", "plots/gate_heatmap.png"} <= artifacts
    # Artifacts live beside the store, not in the working directory.
    assert (tmp_path / "mlartifacts").is_dir()

    # The model is logged as a pyfunc whose bundle holds weights, config, manifest and vocabularies;
    # the weights are a state dict that loads into a fresh (plain EBC) model.
    model_uri = log_model(
        result.model_dir, result.run_id, read_holdout(synthetic_manifest.raw_path("test")), tracking_uri=uri
    )
    bundle = bundle_path(
        Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    )
    assert {"model.safetensors", "model_config.json", "manifest.json"} <= {p.name for p in bundle.iterdir()}
    assert sorted(p.name for p in (bundle / "vocab").iterdir()) == sorted(
        Path(v).name for v in synthetic_manifest.vocab_files.values()
    )
    local = bundle / "model.safetensors"
    model = MultiTaskRanker(synthetic_manifest, ModelConfig())
    model.load_state_dict(load_file(str(local)))
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
