"""`make demo`: the whole flow on a generated event log, with nothing to download or start.

generate a synthetic feed log → build features with the Polars pipeline → train an MMoE on
click and conversion → track it in the embedded MLflow store → register it and run the
promotion gate → batch-score the holdout with the champion.
"""

from __future__ import annotations

import time
from pathlib import Path

from recsys_moe.config import load_config
from recsys_moe.features import load_spec
from recsys_moe.pipelines.build import build
from recsys_moe.pipelines.sources import synthetic
from recsys_moe.registry.publish import publish
from recsys_moe.registry.versions import Registry
from recsys_moe.report import print_result
from recsys_moe.tracking.tracker import MlflowTracker
from recsys_moe.training.loop import TrainResult
from recsys_moe.training.trainer import train

EXPERIMENT = "recsys-moe/demo"
MODEL_NAME = "demo-ranker"


def run_demo(workdir: Path, impressions: int = 400_000, epochs: int = 4, seed: int = 0) -> TrainResult:
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    config = synthetic.SyntheticConfig(n_impressions=impressions, seed=seed)
    print(
        f"[1/6] generating {impressions:,} impressions ({config.n_users:,} users, {config.n_items:,} items, "
        f"{config.n_days} days)"
    )
    synthetic.write(synthetic.generate(config), workdir / "raw")

    print("[2/6] building features (Polars pipeline, spec features/specs/synthetic.yaml)")
    manifest = build(load_spec("synthetic"), workdir / "raw", workdir / "dataset")
    for split, info in manifest.splits.items():
        print(f"      {split:>5}: {info.rows_out:,} rows ({info.rows_rejected} rejected)")

    print("[3/6] training MMoE on tasks click + conversion")
    run_config = load_config(
        None, [f"train.epochs={epochs}", f"train.seed={seed}", f"train.checkpoint_dir={workdir / 'runs'}"]
    )
    with MlflowTracker(EXPERIMENT, run_name=f"demo-mmoe-{time.strftime('%Y%m%d-%H%M%S')}") as tracker:
        result = train(manifest, run_config, tracker=tracker)

    print_result(result)

    print(f"[4/6] registering as {MODEL_NAME!r}; the gate compares it with the champion on the test rows")
    registered = publish(result, manifest, MODEL_NAME, tracking_uri=tracker.uri).registered
    assert registered is not None  # publish registers when given a name
    verdict = "promoted to champion" if registered.decision.promote else "kept as challenger"
    print(f"      v{registered.version}: {verdict} — {registered.decision.reason}")

    print("[5/6] batch scoring the test rows with the champion")
    from recsys_moe.scoring.batch import score_parquet

    registry = Registry(tracker.uri)
    name, version = registry.resolve(f"models:/{MODEL_NAME}@champion")
    report = score_parquet(
        registry.scorer(name, version),
        manifest.raw_path("test"),
        workdir / "scores.parquet",
        model=f"models:/{name}/{version}",
    )
    print(f"      {report.rows_out:,} rows scored by v{version} → {report.output} ({report.rows_per_s:,.0f} rows/s)")

    print("[6/6] done. Next:")
    print(f"      recsys-moe models {MODEL_NAME}")
    print(f"      recsys-moe serve --model models:/{MODEL_NAME}@champion")
    print(f"finished in {time.perf_counter() - start:.0f} s")
    return result
