"""`recsys-moe`: the command line. Each subcommand is one step of the flow; `demo` runs them all.

Heavy imports (torch, torchrec, mlflow) happen inside the subcommands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from recsys_moe.config import Arch

ARCHS = list(get_args(Arch))

EPILOG = """\
the flow, step by step:
  recsys-moe generate data/raw/synthetic                  # a synthetic event log
  recsys-moe pipeline --spec synthetic --data data/raw/synthetic --out data/synthetic
  recsys-moe train --data data/synthetic --arch mmoe      # tracked in ./mlruns.db
  recsys-moe ui                                           # open the MLflow UI on that store

or all at once:  recsys-moe demo
"""


def _cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.sources import synthetic

    config = synthetic.SyntheticConfig(
        n_users=args.users, n_items=args.items, n_impressions=args.impressions, n_days=args.days, seed=args.seed
    )
    paths = synthetic.write(synthetic.generate(config), Path(args.out))
    print(f"wrote {config.n_impressions:,} impressions over {config.n_days} days to {paths['impressions']}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from features import load_spec
    from pipelines.build import build

    manifest = build(
        load_spec(args.spec), Path(args.data), Path(args.out), args.rows_per_shard, args.max_reject_rate, progress=True
    )
    for split, info in manifest.splits.items():
        rejected = f", {info.rows_rejected:,} rejected → {args.out}/{info.rejects}" if info.rows_rejected else ""
        print(f"{split:>5}: {info.rows_in:,} rows in, {info.rows_out:,} out{rejected}")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def _run_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from recsys_moe.config import load_config

    overrides = list(args.set or [])
    for flag, key in (("arch", "model.arch"), ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
                      ("seed", "train.seed"), ("checkpoint_dir", "train.checkpoint_dir"),
                      ("experiment", "tracking.experiment")):  # fmt: skip
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "tasks", None):
        overrides.append(f"train.tasks=[{','.join(args.tasks)}]")
    if getattr(args, "no_tracking", False):
        overrides.append("tracking.enabled=false")
    return load_config(args.config, overrides)


def _tracker(config, spec_name: str, resume_dir: Path | None = None):  # type: ignore[no-untyped-def]
    from recsys_moe.tracking.tracker import MlflowTracker, NullTracker

    if not config.tracking.enabled:
        return NullTracker()
    run_id = None
    if resume_dir is not None and (resume_dir / "last" / "model_config.json").exists():
        import json

        run_id = json.loads((resume_dir / "last" / "model_config.json").read_text()).get("run_id")
    experiment = config.tracking.experiment or f"recsys-moe/{spec_name}"
    return MlflowTracker(experiment, run_name=config.tracking.run_name, run_id=run_id)


def _cmd_train(args: argparse.Namespace) -> int:
    from pipelines.manifest import Manifest
    from recsys_moe.training.trainer import train

    manifest = Manifest.load(args.data)
    config = _run_config(args)
    run_dir = config.train.checkpoint_dir or Path("runs") / f"{manifest.spec.name}-{config.model.arch}"
    config.train.checkpoint_dir = run_dir
    tracker = _tracker(config, manifest.spec.name, run_dir if args.resume else None)
    try:
        result = train(manifest, config, tracker=tracker, progress=True, resume=args.resume)
    except BaseException:
        tracker.close("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    tracker.close()
    from recsys_moe.report import print_result

    print_result(result)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from recsys_moe.demo import run_demo

    run_demo(Path(args.workdir), impressions=args.impressions, epochs=args.epochs)
    return 0


def _cmd_specs(args: argparse.Namespace) -> int:
    from features import BUNDLED_SPECS, load_spec

    for path in sorted(BUNDLED_SPECS.glob("*.yaml")):
        spec = load_spec(path)
        print(
            f"{path.stem:<16} {len(spec.features):>3} features, tasks {[t.name for t in spec.tasks]}: {spec.description}"
        )
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import os
    import shlex

    from recsys_moe.tracking.store import tracking_uri, ui_command

    command = ui_command(tracking_uri()).replace("--port 5000", f"--port {args.port}")
    print(command)
    if args.print_only or not command.startswith("mlflow "):
        return 0
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = shlex.split(command)
    os.execv(str(mlflow), [str(mlflow), *argv[1:]])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-moe",
        description="Multi-task ranking with Mixture-of-Experts: feature specs → Polars pipelines → TorchRec models → MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="write a synthetic recsys event log (users, items, impressions)")
    p.add_argument("out", help="output directory")
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--impressions", type=int, default=200_000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("pipeline", help="raw data + feature spec → validated parquet shards + manifest")
    p.add_argument("--spec", required=True, help="spec YAML path or bundled name (see `recsys-moe specs`)")
    p.add_argument("--data", required=True, help="raw data directory for the spec's dataset source")
    p.add_argument("--out", required=True, help="dataset directory to (re)build")
    p.add_argument("--rows-per-shard", type=int, default=1_000_000)
    p.add_argument("--max-reject-rate", type=float, default=0.05, help="fail when more rows than this are rejected")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("train", help="train a multi-task model on a built dataset, tracked in MLflow")
    p.add_argument("--data", required=True, help="dataset directory (or its manifest.json)")
    p.add_argument("--config", help="run config YAML (model/train/tracking sections); defaults otherwise")
    p.add_argument("--arch", choices=ARCHS, help="multi-task architecture (default mmoe)")
    p.add_argument("--tasks", nargs="+", help="train only these tasks (single_task takes one)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-dir", help="where best/ and last/ checkpoints go (default runs/<spec>-<arch>)")
    p.add_argument("--experiment", help="MLflow experiment (default recsys-moe/<spec>)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any config field")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint dir's last/ checkpoint")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="generate → pipeline → train MMoE → MLflow, end to end (a few minutes)")
    p.add_argument("--workdir", default="demo", help="where data and checkpoints go")
    p.add_argument("--impressions", type=int, default=400_000)
    p.add_argument("--epochs", type=int, default=4)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("specs", help="list the bundled feature specs")
    p.set_defaults(func=_cmd_specs)

    p = sub.add_parser("ui", help="open the MLflow UI on the tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--print-only", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=_cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recsys_moe import logs

    logs.setup(args.verbose)
    from features.expressions import ExpressionError
    from features.spec import SpecError
    from recsys_moe.config import ConfigError

    expected: tuple[type[BaseException], ...] = (SpecError, ConfigError, ExpressionError, FileNotFoundError)
    try:
        from pipelines.build import RejectRateError
        from pipelines.manifest import ManifestError
        from pipelines.validate import SchemaError

        expected += (RejectRateError, SchemaError, ManifestError)
        return int(args.func(args))
    except expected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
