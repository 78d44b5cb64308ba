"""`recsys-moe`: the command line. Each subcommand is one step of the flow; `demo` runs them all.

Heavy imports (torch, torchrec, mlflow) happen inside the subcommands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from recsys_moe.config import ARCHITECTURES

if TYPE_CHECKING:
    from recsys_moe.config import RunConfig
    from recsys_moe.distributed.launch import Nodes
    from recsys_moe.registry.promotion import Decision, PromotionConfig
    from recsys_moe.scoring import RankingConfig, Scorer
    from recsys_moe.serving.settings import ServingSettings
    from recsys_moe.training.loop import TrainResult

EPILOG = """\
the flow, step by step:
  recsys-moe generate data/raw/synthetic                  # a synthetic event log
  recsys-moe pipeline --spec synthetic --data data/raw/synthetic --out data/synthetic
  recsys-moe train --data data/synthetic --arch mmoe --register ranker   # tracked in ./mlruns.db, gated
  recsys-moe models ranker                                # versions, aliases, holdout metrics
  recsys-moe score --model models:/ranker@champion --input data/synthetic/raw/test.parquet --out scores.parquet
  recsys-moe serve --model models:/ranker@champion        # HTTP: /v1/score, /v1/rank, /docs
  recsys-moe rollback ranker                              # champion back to the previous version
  recsys-moe ui                                           # open the MLflow UI on that store

or all at once:  recsys-moe demo
"""


# What to install when an optional part is missing (pyproject.toml's extras; README, Installing).
MISSING = {
    "fastapi": "pip install 'recsys-moe[serving]'",
    "uvicorn": "pip install 'recsys-moe[serving]'",
    "prometheus_client": "pip install 'recsys-moe[serving]'",
    "airflow": "pip install 'recsys-moe[airflow]'",
    "triton": "pip install 'recsys-moe[gpu]'",
    "torchrec": "pip install fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.8.0 (README, Installing)",
    "fbgemm_gpu": "pip install fbgemm-gpu-cpu==1.8.0 (README, Installing)",
}


def _cmd_generate(args: argparse.Namespace) -> int:
    from recsys_moe.pipelines.sources import synthetic

    if args.source == "criteo_like":
        from recsys_moe.pipelines.sources import criteo

        cc = criteo.CriteoConfig(n_rows=args.impressions, n_days=args.days, seed=args.seed)
        events = criteo.write(criteo.generate(cc), Path(args.out))
        print(
            f"wrote {cc.n_rows:,} Criteo-like rows over {cc.n_days} days to {events} (build it with --spec criteo_like)"
        )
        return 0
    config = synthetic.SyntheticConfig(
        n_users=args.users, n_items=args.items, n_impressions=args.impressions, n_days=args.days, seed=args.seed
    )
    paths = synthetic.write(synthetic.generate(config), Path(args.out))
    print(f"wrote {config.n_impressions:,} impressions over {config.n_days} days to {paths['impressions']}")
    return 0


def _parse_days(text: str) -> list:
    """`2026-01-05`, `2026-01-05,2026-01-07` or `2026-01-05..2026-01-09` → dates."""
    import datetime

    days: list[datetime.date] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("..")
        try:
            a = datetime.date.fromisoformat(first)
            b = datetime.date.fromisoformat(last) if last else a
        except ValueError:
            raise ValueError(f"--days: {part.strip()!r} is not YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD") from None
        if b < a:
            raise ValueError(f"--days: {part.strip()!r} ends before it starts")
        days += [a + datetime.timedelta(days=i) for i in range((b - a).days + 1)]
    return sorted(set(days))


def _cmd_history(args: argparse.Namespace) -> int:
    from recsys_moe.features import load_spec
    from recsys_moe.pipelines import history_units as units

    spec = load_spec(args.spec)
    if spec.history is None:
        raise ValueError(f"spec {spec.name!r} has no history section: nothing to compute")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "_units"
    plan = units.Plan(spec, work, out, buckets=args.buckets, id_buckets=args.id_buckets)
    data = Path(args.data)
    if args.days:
        days = _parse_days(args.days)
    else:
        days = units.raw_days(data) if args.rebuild else units.missing_days(plan, data)
    if not days:
        print(f"{out} is up to date with {data}: nothing to compute")
        return 0
    built = units.build_local(plan, data, days, workers=args.workers, rebuild=args.rebuild)
    print(
        f"history features of {len(built.days)} day(s) ({built.days[0]}..{built.days[-1]}) → {out}: "
        f"{built.rows_out:,} rows; {built.units} units"
    )
    print(
        f"checked {built.rows_checked:,} raw rows: {built.rejected:,} rejected by the event contract, "
        f"{built.duplicates:,} duplicates in the whole log (rows with reasons: {work / 'rejects'}, "
        f"{work / 'duplicates'})"
    )
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from recsys_moe.features import load_spec
    from recsys_moe.pipelines.build import build
    from recsys_moe.pipelines.definition import load_definition

    flags = ("spec", "data", "out", "rows_per_shard", "max_reject_rate", "history_dir", "rebuild_history")
    job = load_definition(args.config, {k: getattr(args, k) for k in flags})
    manifest = build(
        load_spec(job.spec),
        job.data,
        job.out,
        job.rows_per_shard,
        job.max_reject_rate,
        progress=True,
        history_dir=job.history_dir,
        rebuild_history=job.rebuild_history,
    )
    args.out = job.out
    if manifest.events is not None:
        ev = manifest.events
        rejected = f", {ev.rows_rejected:,} rejected → {args.out}/{ev.rejects}" if ev.rows_rejected else ""
        print(
            f"events: {ev.rows_in:,} in, {ev.rows_out:,} valid{rejected}; history features: "
            f"{ev.days_computed} new day(s) in {ev.history_dir}"
        )
    for split, info in manifest.splits.items():
        rejected = f", {info.rows_rejected:,} rejected → {args.out}/{info.rejects}" if info.rows_rejected else ""
        print(f"{split:>5}: {info.rows_in:,} rows in, {info.rows_out:,} out{rejected}")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def _run_config(args: argparse.Namespace) -> RunConfig:
    from recsys_moe.config import load_config

    overrides = list(args.set or [])
    for flag, key in (
        ("arch", "model.arch"),
        ("epochs", "train.epochs"),
        ("batch_size", "train.batch_size"),
        ("seed", "train.seed"),
        ("checkpoint_dir", "train.checkpoint_dir"),
        ("experiment", "tracking.experiment"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "tasks", None):
        overrides.append(f"train.tasks=[{','.join(args.tasks)}]")
    if getattr(args, "no_tracking", False):
        overrides.append("tracking.enabled=false")
    return load_config(args.config, overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from recsys_moe.pipelines.manifest import Manifest
    from recsys_moe.report import print_result
    from recsys_moe.tracking.tracker import open_tracker
    from recsys_moe.training import checkpoint
    from recsys_moe.training.trainer import train

    manifest = Manifest.load(args.data)
    config = _run_config(args)
    run_dir = config.run_dir(manifest.spec.name)
    config.train.checkpoint_dir = run_dir
    found = checkpoint.latest(run_dir) if args.resume else None
    if found is not None and checkpoint.is_sharded(found) != (args.nproc is not None):
        if checkpoint.is_sharded(found):
            ranks = checkpoint.read_progress(found).world_size
            how = f"sharded training on {ranks} rank(s); resume it with --nproc N (any N: the tables are resharded)"
        else:
            how = "single-process training; resume it without --nproc"
        print(f"error: {found} was written by {how}", file=sys.stderr)
        return 2
    nodes = None
    if args.nnodes != 1:
        from recsys_moe.distributed.launch import Nodes

        if args.nnodes < 1:
            print(f"error: --nnodes must be at least 1, got {args.nnodes}", file=sys.stderr)
            return 2
        if args.nproc is None or args.rdzv_endpoint is None:
            print("error: --nnodes needs --nproc (ranks per node) and --rdzv-endpoint HOST:PORT", file=sys.stderr)
            return 2
        try:
            nodes = Nodes(args.nnodes, args.rdzv_endpoint, args.rdzv_id)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.nproc is not None and not manifest.sparse_features:
        print(
            f"error: {args.data} has no sparse features, so no tables to shard: train it without --nproc",
            file=sys.stderr,
        )
        return 2
    if args.nproc is not None:
        result = _train_distributed(args, config, run_dir, nodes)
        if result is None:
            return 1
        if result == "elsewhere":
            return 0
    else:
        run_id = checkpoint.resume_run_id(run_dir) if args.resume else None
        with open_tracker(config.tracking, manifest.spec.name, config.model.arch, run_id) as tracker:
            result = train(manifest, config, tracker=tracker, progress=True, resume=args.resume)
    print_result(result)
    if result.run_id is None:
        if args.register:
            print("error: --register needs tracking (drop --no-tracking)", file=sys.stderr)
            return 2
        return 0
    from recsys_moe.registry.publish import publish

    published = publish(result, manifest, args.register, _promotion(args), result.tracking_uri)
    print(f"model: {published.model_uri}")
    if published.registered is not None:
        _print_decision(published.registered.name, published.registered.version, published.registered.decision)
    return 0


def _train_distributed(
    args: argparse.Namespace, config: RunConfig, run_dir: Path, nodes: Nodes | None
) -> TrainResult | Literal["elsewhere"] | None:
    """torchrun with --nproc ranks (on each of --nnodes nodes); rank 0's result, "elsewhere" when
    this node's ranks finished and rank 0 ran on another node, or None if a rank failed."""
    from recsys_moe.distributed.launch import launch
    from recsys_moe.distributed.train import PLAN_FILE, RESULT_FILE

    proc, result = launch(args.data, config, args.nproc, run_dir, resume=args.resume, nodes=nodes)
    if proc.returncode == 0 and result is None and nodes is not None:
        print(f"this node's ranks finished; rank 0 ran on another node and wrote {run_dir / RESULT_FILE}")
        return "elsewhere"
    if result is None or result.sharding is None:
        print(
            f"error: distributed training failed (torchrun exit {proc.returncode}); each rank's traceback is above",
            file=sys.stderr,
        )
        return None
    print(f"trained on {result.sharding.world_size} rank(s); sharding plan: {run_dir / PLAN_FILE}")
    return result


def _promotion(args: argparse.Namespace) -> PromotionConfig:
    from recsys_moe.registry.promotion import PromotionConfig

    return PromotionConfig(
        metrics=args.metrics or [],
        margin=args.margin,
        tolerance=args.tolerance,
        beat_baselines_by=args.beat_baselines_by,
    )


def _print_decision(name: str, version: str, decision: Decision) -> None:
    verdict = "PROMOTED to champion" if decision.promote else "kept as challenger"
    print(f"{name} v{version}: {verdict} — {decision.reason}")
    for metric, value in decision.candidate.items():
        champ = decision.champion.get(metric)
        print(f"  {metric:<24} candidate {value:.4f}" + (f"   champion {champ:.4f}" if champ is not None else ""))


def _cmd_promote(args: argparse.Namespace) -> int:
    from recsys_moe.registry.promotion import read_holdout
    from recsys_moe.registry.versions import Registry

    decision = Registry().gate(
        args.name, str(args.version), read_holdout(Path(args.holdout)), _promotion(args), args.force
    )
    _print_decision(args.name, args.version, decision)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from recsys_moe.registry.versions import Registry

    old, new = Registry().rollback(args.name, to=args.to)
    print(f"{args.name}: champion rolled back from v{old} to v{new}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from recsys_moe.registry.versions import Registry

    registry = Registry()
    if not args.name:
        for model in registry.client.search_registered_models():
            aliases = ", ".join(f"{a}=v{v}" for a, v in sorted((model.aliases or {}).items()))
            print(f"{model.name:<24} {aliases}")
        return 0
    rows = registry.versions(args.name)
    if not rows:
        print(f"no versions of {args.name!r} in {registry.uri}")
        return 1
    print(f"{'version':>7}  {'aliases':<20} {'gate':<13} metrics")
    for r in rows:
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        print(f"{r['version']:>7}  {r['aliases']:<20} {r['decision']:<13} {metrics}")
    return 0


def _scorer(model: str) -> tuple[Scorer, str]:
    """A bundle directory, or a registry URI (models:/NAME@ALIAS, models:/NAME/VERSION) → the
    scorer and what to call it (the version an alias resolved to)."""
    from recsys_moe.scoring import Scorer

    if model.startswith("models:/"):
        from recsys_moe.registry.versions import Registry

        registry = Registry()
        name, version = registry.resolve(model)
        print(f"model: {name} v{version}")
        return registry.scorer(name, version), f"models:/{name}/{version}"
    return Scorer(Path(model)), str(Path(model).resolve())


def _ranking(args: argparse.Namespace) -> RankingConfig:
    from recsys_moe.scoring import RankingConfig

    weights = {}
    for item in args.weight or []:
        task, _, value = item.partition("=")
        weights[task] = float(value)
    return RankingConfig(kind=args.ranking or "weighted_sum", weights=weights)


def _cmd_score(args: argparse.Namespace) -> int:
    from recsys_moe.scoring.batch import score_parquet

    scorer, label = _scorer(args.model)
    report = score_parquet(scorer, Path(args.input), Path(args.output), _ranking(args), args.chunk_rows, model=label)
    print(f"{report.rows_in:,} rows in, {report.rows_out:,} scored → {report.output} ({report.rows_per_s:,.0f} rows/s)")
    if report.rejects is not None:
        print(f"{report.rows_rejected:,} rows rejected → {report.rejects}")
    print(f"completion record: {report.record}")
    return 0


def serve_settings(args: argparse.Namespace) -> ServingSettings:
    """The settings file (`--config`, e.g. serving/serving.yaml), then the flags given on top."""
    from recsys_moe.config import origin_of, read_yaml, validated
    from recsys_moe.serving.settings import ServingSettings

    raw = read_yaml(args.config) if args.config else {}
    if args.model is not None:  # a model on the command line replaces the file's, whichever kind
        raw.pop("model_uri", None)
        raw.pop("model_dir", None)
        raw["model_uri" if args.model.startswith("models:/") else "model_dir"] = args.model
    flags = {
        "host": args.host,
        "port": args.port,
        "poll_seconds": args.poll_seconds,
        "max_rows": args.max_rows,
        "torch_threads": args.threads,
        "scoring_workers": args.scoring_workers,
        "wait_for_model": args.wait,
        "token": args.token,
    }
    raw.update({k: v for k, v in flags.items() if v is not None})
    if args.ranking is not None or args.weight:
        raw["ranking"] = _ranking(args).model_dump()
    given = {**flags, "model": args.model, "ranking": args.ranking, "weight": args.weight}
    return validated(ServingSettings, raw, origin_of(args.config, given, "recsys-moe serve"), "serving settings")


def _cmd_serve(args: argparse.Namespace) -> int:
    from recsys_moe.serving.app import run

    settings = serve_settings(args)
    source = settings.model_uri or settings.model_dir
    print(f"serving {source} on http://{settings.host}:{settings.port}  (docs: /docs, metrics: /metrics)")
    run(settings)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from recsys_moe.demo import run_demo

    run_demo(Path(args.workdir), impressions=args.impressions, epochs=args.epochs)
    return 0


def _cmd_specs(args: argparse.Namespace) -> int:
    from recsys_moe.features import BUNDLED_SPECS, load_spec

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


def _gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        nargs="+",
        metavar="TASK.METRIC",
        help="metrics the gate compares (default: auc of every binary task, r2 of every regression task)",
    )
    p.add_argument("--margin", type=float, default=0.0, help="required mean improvement over the champion")
    p.add_argument("--tolerance", type=float, default=0.002, help="largest allowed regression on any one metric")
    p.add_argument(
        "--beat-baselines-by",
        type=float,
        metavar="MARGIN",
        help="also require the candidate's run to beat the baselines fitted in it by MARGIN on every metric",
    )
    p.epilog = (p.epilog or "") + " Metrics: auc, gauc (specs with a group_key), logloss, r2, mse."


def _ranking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ranking",
        choices=["weighted_sum", "weighted_product"],
        help="how task scores combine into the ranking score (default weighted_sum)",
    )
    p.add_argument(
        "--weight", action="append", metavar="TASK=W", help="a task's weight in the ranking score (default 1)"
    )


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
    p.add_argument(
        "--source",
        choices=["synthetic", "criteo_like"],
        default="synthetic",
        help="synthetic: feed impressions with users/items/side tables (spec synthetic); criteo_like: "
        "26 power-law categoricals up to 10M ids, 13 counts, a history (spec criteo_like)",
    )
    p.add_argument("--impressions", type=int, default=200_000, help="rows to generate")
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("pipeline", help="raw data + feature spec → validated parquet shards + manifest")
    p.add_argument("--config", help="a pipeline definition YAML (see pipelines/); the flags below override it")
    p.add_argument("--spec", help="spec YAML path or bundled name (see `recsys-moe specs`)")
    p.add_argument("--data", help="raw data directory for the spec's dataset source")
    p.add_argument("--out", help="dataset directory to (re)build")
    p.add_argument("--rows-per-shard", type=int, help="rows per parquet shard (default 1,000,000)")
    p.add_argument("--max-reject-rate", type=float, help="fail when more rows than this are rejected (default 0.05)")
    p.add_argument(
        "--history-dir",
        help="specs with history features: where their day partitions live "
        "(default <out>.history, beside the dataset); only days not there yet are computed",
    )
    p.add_argument(
        "--rebuild-history", action="store_true", default=None, help="recompute every day's history features"
    )
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser(
        "history",
        help="history features of a day-partitioned event log, in units of work (those the Airflow DAG maps)",
        description="Compute the point-in-time history features of an event log in units that each hold one "
        "day or one bucket of it (pipelines/history_units.py), so memory stays bounded however long the "
        "log. Writes the same day partitions as `pipeline --history-dir`, which then reuses them.",
    )
    p.add_argument(
        "--data", required=True, help="the raw log: impressions/day=YYYY-MM-DD/, users.parquet, items.parquet"
    )
    p.add_argument("--out", required=True, help="the history folder (day=YYYY-MM-DD/part-0.parquet)")
    p.add_argument("--spec", default="synthetic_history", help="a spec with a history section (default %(default)s)")
    p.add_argument("--work", help="the units' intermediate files (default <out>/_units)")
    p.add_argument(
        "--days", help="days to compute: 2026-01-05, a list (a,b) or a range (a..b); default the days --out lacks"
    )
    p.add_argument("--buckets", type=int, default=16, help="buckets per key column: more, smaller units (default 16)")
    p.add_argument("--id-buckets", type=int, default=4, help="units that find duplicates across days (default 4)")
    p.add_argument("--workers", type=int, default=1, help="processes that run units side by side (default 1)")
    p.add_argument("--rebuild", action="store_true", help="recompute every day")
    p.set_defaults(func=_cmd_history)

    p = sub.add_parser("train", help="train a multi-task model on a built dataset, tracked in MLflow")
    p.add_argument("--data", required=True, help="dataset directory (or its manifest.json)")
    p.add_argument("--config", help="run config YAML (model/train/tracking sections); defaults otherwise")
    p.add_argument(
        "--arch",
        choices=list(ARCHITECTURES),
        help="multi-task architecture (default mmoe): "
        + "; ".join(f"{name}: {what}" for name, what in ARCHITECTURES.items()),
    )
    p.add_argument("--tasks", nargs="+", help="train only these tasks (single_task takes one)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-dir", help="where best/ and last/ checkpoints go (default runs/<spec>-<arch>)")
    p.add_argument("--experiment", help="MLflow experiment (default recsys-moe/<spec>)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any config field")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint dir's last/ checkpoint")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--register", metavar="NAME", help="register the model as a new version of NAME and run the gate")
    p.add_argument(
        "--nproc",
        type=int,
        help="sharded training (TorchRec DistributedModelParallel) on this many "
        "ranks under torchrun: gloo on the CPU, NCCL on CUDA; 1 is allowed, e.g. to resume a "
        "sharded checkpoint on one process. Default: single-process training",
    )
    p.add_argument(
        "--nnodes",
        type=int,
        default=1,
        help="nodes in a multi-node run: run this same command on each, with --nproc ranks per node, the "
        "dataset and --checkpoint-dir on storage every node sees, and one --rdzv-endpoint",
    )
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="where the nodes meet (a free port on one of them)")
    p.add_argument("--rdzv-id", default="recsys-moe", help="rendezvous id, the same on every node of one run")
    _gate_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("promote", help="gate a registered version against the champion; promote it if better")
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", required=True, help="the candidate version")
    p.add_argument(
        "--holdout", required=True, help="raw labeled rows (parquet file or directory), e.g. <dataset>/raw/test.parquet"
    )
    p.add_argument("--force", action="store_true", help="promote even if the gate says no (recorded as forced)")
    _gate_args(p)
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("rollback", help="point champion back at the version it replaced")
    p.add_argument("name", help="registered model name")
    p.add_argument("--to", metavar="VERSION", help="this version instead (e.g. when the champion is the first one)")
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser("models", help="list registered models, or one model's versions, aliases and metrics")
    p.add_argument("name", nargs="?", help="registered model name")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("score", help="batch scoring: parquet of raw rows in → keys + per-task scores out")
    p.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/VERSION or a model directory")
    p.add_argument("--input", required=True, help="parquet file or directory of raw rows")
    p.add_argument("--output", required=True, help="output parquet file (rejects go beside it)")
    p.add_argument("--chunk-rows", type=int, default=65_536, help="rows per chunk (bounds memory)")
    _ranking_args(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("serve", help="online endpoint: POST /v1/score, POST /v1/rank, /healthz, /readyz, /metrics")
    p.add_argument("--config", help="a serving settings YAML (e.g. serving/serving.yaml); the flags below override it")
    p.add_argument(
        "--model", help="models:/NAME@champion (follows the alias), models:/NAME/VERSION or a model directory"
    )
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--poll-seconds", type=float, help="how often to check the alias for a new version (default 30)")
    p.add_argument("--max-rows", type=int, help="most rows or candidates per request (default 1000)")
    p.add_argument("--threads", type=int, help="torch threads per request, 1-256 (default $RECSYS_MOE_THREADS, else 1)")
    p.add_argument(
        "--scoring-workers",
        type=int,
        help="requests scored at once, 1-64; the rest queue (default: half the cores, ≥ 1). 1 scores in the event "
        "loop's thread, the fastest; more in worker threads, probes answered meanwhile",
    )
    p.add_argument("--token", help="require this bearer token on /v1/* (default: $RECSYS_MOE_TOKEN if set)")
    p.add_argument(
        "--wait",
        action="store_true",
        default=None,
        help="start even if the alias does not exist yet (503 until then)",
    )
    _ranking_args(p)
    p.set_defaults(func=_cmd_serve)

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
    from recsys_moe.config import ConfigError
    from recsys_moe.features.expressions import ExpressionError
    from recsys_moe.features.spec import SpecError
    from recsys_moe.signals import terminate_as_interrupt

    expected: tuple[type[BaseException], ...] = (SpecError, ConfigError, ExpressionError, FileNotFoundError)
    try:
        from mlflow.exceptions import MlflowException

        from recsys_moe.pipelines.build import RejectRateError
        from recsys_moe.pipelines.manifest import ManifestError
        from recsys_moe.pipelines.validate import SchemaError
        from recsys_moe.registry.lock import LockTimeoutError
        from recsys_moe.registry.versions import RegistryError

        expected += (RejectRateError, SchemaError, ManifestError, RegistryError, LockTimeoutError, ValueError)
        expected += (MlflowException, PermissionError)
        if args.command == "serve":  # uvicorn handles SIGTERM itself: a graceful shutdown
            return int(args.func(args))
        with terminate_as_interrupt():
            return int(args.func(args))
    except expected as exc:
        if args.verbose:
            raise
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        text = lines[0] if isinstance(exc, MlflowException) else "\n".join(lines)  # MLflow adds stack dumps
        print(f"error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(
            f"interrupted ({exc or 'Ctrl-C'}): what was written is whole; a training run continues with --resume",
            file=sys.stderr,
        )
        return 130
    except ModuleNotFoundError as exc:
        hint = MISSING.get((exc.name or "").split(".")[0])
        if hint is None or args.verbose:
            raise
        print(f"error: {exc.name} is not installed: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
