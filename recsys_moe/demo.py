"""`make demo`: the whole flow on a generated event log, with nothing to download or start.

generate a synthetic feed log → build features with the Polars pipeline → train an MMoE on
click and conversion → track it in the embedded MLflow store → print per-task test AUCs.
"""

from __future__ import annotations

import time
from pathlib import Path

from features import load_spec
from pipelines.build import build
from pipelines.sources import synthetic
from recsys_moe.config import load_config
from recsys_moe.report import print_result
from recsys_moe.tracking.tracker import MlflowTracker
from recsys_moe.training.trainer import TrainResult, train

EXPERIMENT = "recsys-moe/demo"


def run_demo(workdir: Path, impressions: int = 400_000, epochs: int = 4, seed: int = 0) -> TrainResult:
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    config = synthetic.SyntheticConfig(n_impressions=impressions, seed=seed)
    print(f"[1/4] generating {impressions:,} impressions ({config.n_users:,} users, {config.n_items:,} items, "
          f"{config.n_days} days)")  # fmt: skip
    synthetic.write(synthetic.generate(config), workdir / "raw")

    print("[2/4] building features (Polars pipeline, spec features/specs/synthetic.yaml)")
    manifest = build(load_spec("synthetic"), workdir / "raw", workdir / "dataset")
    for split, info in manifest.splits.items():
        print(f"      {split:>5}: {info.rows_out:,} rows ({info.rows_rejected} rejected)")

    print("[3/4] training MMoE on tasks click + conversion")
    run_config = load_config(
        None, [f"train.epochs={epochs}", f"train.seed={seed}", f"train.checkpoint_dir={workdir / 'runs'}"]
    )
    tracker = MlflowTracker(EXPERIMENT, run_name=f"demo-mmoe-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        result = train(manifest, run_config, tracker=tracker)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()

    print("[4/4] done")
    print_result(result, time.perf_counter() - start)
    return result
