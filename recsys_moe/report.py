"""What a finished training run prints: per-task test metrics and where to find everything."""

from __future__ import annotations

from recsys_moe.tracking.store import ui_command
from recsys_moe.training.loop import TrainResult


def print_result(result: TrainResult, elapsed: float | None = None) -> None:
    print(f"\nbest epoch {result.best_epoch}; test metrics:")
    for task, metrics in result.test.metrics.items():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "score")
        print(f"  {task:<16} {shown}")
    for b in result.baselines:
        shown = "  ".join(f"{task} {m.get('auc', m.get('r2', float('nan'))):.4f}" for task, m in b["test"].items())
        print(f"  baseline {b['name']:<9} {shown}   ({b['detail']})")
    print(f"training throughput: {result.train_samples_per_s:,.0f} samples/s")
    print(f"model weights: {result.model_dir}")
    if result.run_id and result.tracking_uri:
        print(f"MLflow run: {result.run_id}  (store: {result.tracking_uri})")
        print(f"open the UI: {ui_command(result.tracking_uri)}")
    if elapsed is not None:
        print(f"finished in {elapsed:.0f} s")
