"""Census-income, the MMoE paper's benchmark: Single-Task, Shared-Bottom, OMoE, MMoE, CGC and PLE
on both task groups, several seeds each, beside the paper's numbers, with training and inference speed.

    make bench-census            # or: python benchmarks/census.py --seeds 5

Writes benchmarks/results/census.md and census.json. Speed is reported as a ratio to the plain-PyTorch
MMoE of benchmarks/reference.py and against the fp32 GEMM rate (the compute ceiling of this
machine), both measured in the same run, not as remembered figures; one more pair of runs beside a
process spinning a core shows the slowdown a shared machine causes. Where the CPU has bf16
instructions, MMoE (`--bf16-archs`) also trains with `train.precision=bf16`, same seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recsys_moe.allocator import retain_freed_memory
from recsys_moe.config import RunConfig, load_config
from recsys_moe.data.loader import Batch, InMemoryDataset
from recsys_moe.features import load_spec
from recsys_moe.kernels import gemm
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.build import build
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training import checkpoint
from recsys_moe.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT.parent / "shared" / "data" / "census-income"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"

# Group 1: Ma et al., KDD 2018, Table 1 (MMoE, Shared-Bottom; best of 200 runs) and Tang et al.,
# RecSys 2020, Table 5 (PLE). The MMoE paper's Table 2 (group 2) was not at hand.
PAPER = {
    "census_group1": {
        "mmoe": {"income": 0.9410, "never_married": 0.9926},
        "shared_bottom": {"income": 0.9361, "never_married": 0.9915},
        "ple": {"income": 0.9522, "never_married": 0.9945},
    }
}
ARCH_NAMES = {
    "single_task": "Single-Task",
    "shared_bottom": "Shared-Bottom",
    "omoe": "OMoE",
    "mmoe": "MMoE",
    "cgc": "CGC",
    "ple": "PLE",
}
# The model: 8 experts of [64, 32], towers [16], embedding dim 8 (the spec), batch 1024.
# CGC/PLE keep 8 experts per layer too: 3 per task + 2 shared; PLE stacks 2 layers.
# Section headings of groups that are a setting of another group rather than a task group of the paper.
HEADINGS = {"census_group1_education": "census_group1, education as an input"}
# Row-name suffixes of the dense products' precision (`train.precision`).
PRECISIONS = {"fp32": "", "bf16": ", bf16 products"}

MODEL = [
    "model.num_experts=8",
    "model.expert_hidden=[64,32]",
    "model.tower_hidden=[16]",
    "model.bottom_hidden=[128,64]",
    "model.num_task_experts=3",
    "model.num_shared_experts=2",
    "model.ple_levels=2",
]


@dataclass
class RunRecord:
    group: str
    arch: str
    tasks: list[str]
    seed: int
    test_auc: dict[str, float]
    best_epoch: int
    epochs_run: int
    train_samples_per_s: float
    infer_samples_per_s: float
    seconds: float
    gemm_gflops: float  # measured just before this run: the VM's speed drifts between runs
    # The dense learning rate's schedule; runs before warmup + cosine became the default had none.
    lr_schedule: str = "constant"
    # The invocation that measured it; the × ref columns divide only by a reference of the same one.
    session: str = ""
    precision: str = "fp32"  # train.precision; runs before it existed were fp32


def gemm_rate(seconds: float = 2.0, onednn: bool = False, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a large matrix product on this machine, now: torch.mm (MKL), or with `onednn` the
    oneDNN product the project's expert block uses (`recsys_moe.kernels.gemm`); fp32, or the bf16
    product `train.precision=bf16` uses (torch.mm on bf16 tensors is oneDNN's too)."""
    a, b = torch.randn(2048, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    product = (lambda: gemm.matmul(a, b)) if onednn else (lambda: a @ b)
    for _ in range(3):
        product()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        product()
        n += 1
    return 2 * 2048 * 1024 * 1024 * n / (time.perf_counter() - start) / 1e9


def cpu_model() -> str:
    """The CPU's vendor, family and model numbers (Linux), e.g. "AMD family 25 model 17".

    The VMs this runs on all call themselves "AMD EPYC" but do not share one core. Zen 4 (family
    25) runs a 512-bit FMA as two 256-bit halves, so oneDNN's AVX-512 GEMMs there go at about
    MKL's AVX2 rate (measured on family 25 model 17: 200-210 against 155-190 GFLOP/s on 2 threads,
    104 on one, its peak); another host ran them at 360-475 against MKL's 207. A share of the
    `torch.mm` bound differs with that, so the results name the CPU.
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if key.strip() == "model name":
                break
    except OSError:
        return platform.processor() or "unknown CPU"
    vendor = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(
        fields.get("vendor_id", ""), fields.get("vendor_id", "?")
    )
    return f"{vendor} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def cpu_description() -> str:
    """The CPU, the vector ISA torch dispatches to, and which GEMM library the expert block uses."""
    isa = torch.backends.cpu.get_cpu_capability()
    library = "oneDNN" if gemm.ONEDNN else "torch.mm"
    return f"{cpu_model()}; torch's CPU capability {isa}; the expert block's GEMMs {library}"


def mmoe_flops_per_sample(d_in: int, experts: int, hidden: list[int], towers: list[int], tasks: int) -> float:
    """Forward + backward FLOPs (backward = 2x forward) of the dense part of an MMoE."""
    dims = [d_in, *hidden]
    macs = experts * sum(a * b for a, b in itertools.pairwise(dims))
    macs += d_in * experts * tasks  # gates
    tower_dims = [hidden[-1], *towers, 1]
    macs += tasks * sum(a * b for a, b in itertools.pairwise(tower_dims))
    macs += tasks * experts * hidden[-1]  # combine
    return 3 * 2 * macs


def scoring_model(
    manifest: Manifest, config: RunConfig, model_dir: Path, tasks: list[str]
) -> tuple[MultiTaskRanker, list[Batch]]:
    """The trained model as scoring loads it (plain EBC, eval mode) and the test split in batches
    of 8192, warmed up by two of them."""
    model = MultiTaskRanker(manifest, config.model, tasks)
    weights, _ = checkpoint.load_weights(model_dir)
    model.load_state_dict(weights)
    model.eval()
    batches = list(InMemoryDataset.from_split(manifest, "test", model.sparse.keys, tasks).batches(8192))
    with torch.no_grad():
        for b in batches[:2]:
            model.predict(b.dense, b.sparse)
    return model, batches


def scoring_pass(model: MultiTaskRanker, batches: list[Batch]) -> float:
    """Seconds to score every batch once."""
    with torch.no_grad():
        start = time.perf_counter()
        for b in batches:
            model.predict(b.dense, b.sparse)
    return time.perf_counter() - start


def inference_rate(manifest: Manifest, config: RunConfig, model_dir: Path, tasks: list[str]) -> float:
    """Scoring speed of the trained model (plain EBC, eval mode, batches of 8192) on the test split."""
    model, batches = scoring_model(manifest, config, model_dir, tasks)
    return sum(len(b) for b in batches) / scoring_pass(model, batches)


def run_one(
    manifest: Manifest,
    group: str,
    arch: str,
    tasks: list[str],
    seed: int,
    epochs: int,
    workdir: Path,
    precision: str = "fp32",
) -> RunRecord:
    overrides = [
        *MODEL,
        f"model.arch={arch}",
        f"train.precision={precision}",
        f"train.seed={seed}",
        f"train.epochs={epochs}",
        "train.patience=3",
        f"train.checkpoint_dir={workdir}",
        "tracking.enabled=false",
        f"train.tasks=[{','.join(tasks)}]",
    ]
    config = load_config(None, overrides)
    gflops = gemm_rate(1.0)
    start = time.perf_counter()
    result = train(manifest, config, progress=False)
    seconds = time.perf_counter() - start
    return RunRecord(
        group=group,
        arch=arch,
        tasks=tasks,
        seed=seed,
        test_auc={t: result.test.metrics[t]["auc"] for t in tasks},
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        train_samples_per_s=result.train_samples_per_s,
        infer_samples_per_s=inference_rate(manifest, config, result.model_dir, tasks),
        seconds=seconds,
        gemm_gflops=gflops,
        lr_schedule=f"{config.train.lr_schedule}, warmup {config.train.warmup_fraction:.0%}",
        precision=precision,
    )


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _same_session(rows: list[RunRecord], meta: dict) -> bool:
    """Whether `rows` were measured with meta's reference ("": runs from before sessions were recorded)."""
    return all(r.session in ("", meta.get("session", "")) for r in rows)


def _times(rate: float, ref: dict[str, float] | None, kind: str, same_session: bool = True) -> str:
    return f"{rate / ref[f'{kind}_samples_per_s']:.2f}" if ref and same_session else "–"


def write_report(records: list[RunRecord], meta: dict, group_tasks: dict[str, list[str]]) -> str:
    ref = meta.get("reference")  # the plain-PyTorch MMoE, measured in this run (benchmarks/reference.py)
    lines = [
        "# Census-income (UCI KDD) — MMoE paper benchmark",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `make bench-census` "
        f"({meta['seeds']} seeds per model, up to {meta['epochs']} epochs, early stopping on the mean "
        "validation AUC with patience 3). Splits as in the paper: train = `census-income.data` "
        "(199,523 rows); `census-income.test` split 1:1 at random (seed 0) into validation and test "
        "(49,881 each). Education and marital status are not inputs, as in the paper. Single-Task trains one "
        "model per task.",
        "",
        "The open-source peers' census examples (torch-rechub, DeepCTR-Torch) keep education as an input, which "
        "is most of why the bundled `census_group1` spec scores below their published AUCs; the section "
        '"census_group1, education as an input" (spec `census_group1_education`) matches their inputs, with '
        "the same split and models.",
        "",
        "Model: MMoE with 8 experts of [64, 32], one softmax gate per task, towers [16], embedding dim 8, "
        "batch 1024, Adam (peak lr 2e-3; the schedule is under each table) for dense weights and fused Adagrad "
        "(lr 0.05) for embeddings. "
        "Shared-Bottom and Single-Task: bottom [128, 64], towers [16]. OMoE: MMoE's experts with one gate "
        "shared by both tasks. CGC: 3 experts per task + 2 shared, each [64, 32]; PLE: two such layers.",
        "",
    ]
    if any(r.precision == "bf16" for r in records):
        lines += [
            'Rows marked "bf16 products" train with `train.precision=bf16`: the first expert layer\'s GEMMs (most '
            "of the dense FLOPs) take bf16 operands, everything else stays fp32, and the saved weights and all "
            "scoring are fp32. Their AUCs answer whether bf16 costs quality; same seeds as the fp32 rows.",
            "",
        ]
    if ref:
        lines += [
            "The × ref columns divide a row's speed by that of the plain-PyTorch MMoE of `benchmarks/reference.py` "
            "(same data, census group 1, the MMoE shapes above), trained for one epoch and scored on the test split "
            f"before and after the runs in this session ({ref['train_samples_per_s']:,.0f} train / "
            f"{ref['infer_samples_per_s']:,.0f} infer samples/s, the mean of the two). Other architectures do "
            "more or less work than that MMoE, so only the MMoE rows compare like with like.",
            "",
        ]
    for group, tasks in group_tasks.items():
        lines += [f"## {HEADINGS.get(group, group)}: tasks {', '.join(tasks)}", ""]
        schedules: set[str] = set()
        header = (
            "| model | runs | "
            + " | ".join(f"{t} test AUC mean ± sd | {t} best" for t in tasks)
            + " | paper (best) | train samples/s | train × ref | infer samples/s | infer × ref |"
        )
        lines += [header, "|" + "---|" * (6 + 2 * len(tasks) + 1)]
        for arch, precision in itertools.product(ARCH_NAMES, PRECISIONS):
            rows = [r for r in records if r.group == group and r.arch == arch and r.precision == precision]
            if not rows:
                continue
            cells = []
            for t in tasks:
                aucs = [r.test_auc[t] for r in rows if t in r.test_auc]
                cells += [_mean_std(aucs), f"{max(aucs):.4f}"] if aucs else ["–", "–"]
            paper = PAPER.get(group, {}).get(arch)
            paper_cell = " / ".join(f"{paper[t]:.4f}" for t in tasks) if paper else "–"
            same = _same_session(rows, meta)
            train_rate = statistics.median(r.train_samples_per_s for r in rows)
            infer_rate = statistics.median(r.infer_samples_per_s for r in rows)
            seeds = len({r.seed for r in rows})
            schedules.update(r.lr_schedule for r in rows)
            lines.append(
                f"| {ARCH_NAMES[arch]}{PRECISIONS[precision]} | {len(rows) // max(len({tuple(r.tasks) for r in rows}), 1)} seeds"
                f"{'' if seeds >= meta['seeds'] else ' (incomplete)'} | "
                + " | ".join(cells)
                + f" | {paper_cell} | {train_rate:,.0f} | {_times(train_rate, ref, 'train', same)} "
                f"| {infer_rate:,.0f} | {_times(infer_rate, ref, 'infer', same)} |"
            )
        lines += ["", f"Dense learning-rate schedule of these runs: {'; '.join(sorted(schedules))}."]
        group_rows = [r for r in records if r.group == group]
        if not _same_session(group_rows, meta):
            sessions = ", ".join(sorted({r.session for r in group_rows if r.session != meta.get("session")}))
            lines.append(
                f"These runs were measured in another session ({sessions}) than the plain-PyTorch reference "
                f"({meta.get('session', 'unrecorded')}), so their × ref columns are left empty: their AUCs "
                "compare, their speeds do not."
            )
        lines.append("")
    # The GEMM bound is the d_in of the group the speed session measured.
    speed_group = meta.get("speed_group", "census_group1")
    mmoe = [r for r in records if r.arch == "mmoe" and r.group == speed_group and r.precision == "fp32"]
    mmoe_bf16 = [r for r in records if r.arch == "mmoe" and r.group == speed_group and r.precision == "bf16"]
    if mmoe:
        flops = meta["mmoe_flops_per_sample"]
        rate = statistics.median(r.train_samples_per_s for r in mmoe)
        rates = [r.gemm_gflops for r in records]
        ratios = [r.train_samples_per_s / (r.gemm_gflops * 1e9 / flops) for r in mmoe]
        cpu = f" ({meta['cpu']})" if "cpu" in meta else ""
        lines += [
            "## Speed against this machine's limit",
            "",
            f"- fp32 `torch.mm` (2048×1024 · 1024×1024), measured for 1 s before every run: median "
            f"**{statistics.median(rates):.0f} GFLOP/s** (range {min(rates):.0f}–{max(rates):.0f}: this VM's speed "
            f"drifts) on {meta['threads']} threads{cpu}.",
            f"- MMoE dense part: {flops / 1e6:.2f} MFLOP per sample for forward + backward (input width "
            f"{meta['d_in']}), so the GEMM-bound limit at the median rate is "
            f"**{statistics.median(rates) * 1e9 / flops:,.0f} samples/s**.",
            f"- MMoE training: **{rate:,.0f} samples/s** (median over runs of each run's median epoch), "
            f"**{statistics.median(ratios):.0%}** of the limit measured beside each run (median), including "
            "embedding lookups and fused updates, batching, loss and optimizer. Open-source peers measured on this "
            "machine reach 20k–36k samples/s.",
        ]
        if "onednn_gflops" in meta:  # the stricter ceiling: the faster GEMM library the expert block runs on
            onednn = meta["onednn_gflops"]
            lines.append(
                f"- oneDNN's fp32 product on the same matrices, measured at the start: **{onednn:.0f} GFLOP/s**; "
                f"at that rate the limit is {onednn * 1e9 / flops:,.0f} samples/s, and MMoE training reaches "
                f"{rate / (onednn * 1e9 / flops):.0%} of it."
            )
        if mmoe_bf16:
            bf16_rate = statistics.median(r.train_samples_per_s for r in mmoe_bf16)
            bf16_share = statistics.median(r.train_samples_per_s / (r.gemm_gflops * 1e9 / flops) for r in mmoe_bf16)
            line = (
                f"- MMoE training with `train.precision=bf16` (the first expert layer's GEMMs on bf16 operands): "
                f"**{bf16_rate:,.0f} samples/s**, {bf16_rate / rate:.2f}x the fp32 runs' median; {bf16_share:.0%} of "
                "the fp32 limit above, which bf16 products are not bound by, so that share is not a claim on it. "
                "Runs minutes apart differ by this VM's drift more than by the precision (the fp32 seeds alone "
                f"ranged {min(r.train_samples_per_s for r in mmoe):,.0f}-{max(r.train_samples_per_s for r in mmoe):,.0f}); "
                "`reference.md` measures bf16 against fp32 by turns in one trainer."
            )
            if "bf16_gflops" in meta:
                bound = meta["bf16_gflops"] * 1e9 / flops
                line += (
                    f" bf16 `torch.mm` on the same matrices, measured at the start: {meta['bf16_gflops']:.0f} GFLOP/s; "
                    f"were every dense FLOP a bf16 product, the limit would be {bound:,.0f} samples/s, "
                    f"{bf16_rate / bound:.0%} of it reached."
                )
            lines.append(line)
        busy = meta.get("neighbour")
        if busy:
            q, b = busy["quiet"], busy["busy"]
            lines.append(
                "- Beside a process spinning one core (one epoch each, group 1 MMoE): the project trains at "
                f"{b['project']['train_samples_per_s']:,.0f} samples/s "
                f"({q['project']['train_samples_per_s'] / b['project']['train_samples_per_s']:.2f}x slower than quiet), "
                f"the reference at {b['reference']['train_samples_per_s']:,.0f} "
                f"({q['reference']['train_samples_per_s'] / b['reference']['train_samples_per_s']:.2f}x slower); "
                f"project / reference: {b['project']['train_samples_per_s'] / b['reference']['train_samples_per_s']:.2f}."
            )
        lines += [
            "- Issue targets: ≥ 0.955 income and ≥ 0.995 marital mean test AUC for MMoE, and ≥ 180k samples/s. "
            "The throughput target assumed 300 GFLOP/s; at the GEMM rate measured here the dense compute alone "
            "caps this model below 180k.",
            "",
        ]
    lines += [
        "Speed columns are medians over a row's runs. Each run also records the GEMM rate measured just "
        "before it (`gemm_gflops` in `census.json`); runs that shared the CPU with other jobs are slower "
        "than that rate predicts, so compare speeds between rows measured in the same session only.",
        "",
        "Raw per-run numbers: `census.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--groups", nargs="+", default=["census_group1", "census_group2"])
    parser.add_argument("--archs", nargs="+", default=list(ARCH_NAMES), choices=list(ARCH_NAMES))
    parser.add_argument(
        "--bf16-archs",
        nargs="*",
        default=["mmoe"],
        choices=list(ARCH_NAMES),
        help="also train these with train.precision=bf16 (where the CPU has bf16 instructions)",
    )
    parser.add_argument("--fresh", action="store_true", help="drop earlier runs in census.json instead of merging")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="rewrite census.md from census.json")
    args = parser.parse_args()
    if args.report_only:
        raw = json.loads((args.out / "census.json").read_text())
        records = [RunRecord(**r) for r in raw["runs"]]
        group_tasks = {g: load_spec(g).task_names for g in sorted({r.group for r in records})}
        report = write_report(records, raw["meta"], group_tasks)
        (args.out / "census.md").write_text(report)
        print(report)
        return 0
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    if not (args.data / "census-income.data.gz").exists():
        print(f"census-income not found at {args.data} (see ../shared/data/census-income/SOURCE.md)", file=sys.stderr)
        return 2

    retain_freed_memory()  # the trainer's process-wide malloc setting, for the reference runs too
    manifests = {}
    for group in args.groups:
        manifests[group] = build(load_spec(group), args.data, CACHE / group, progress=False)
    m1 = manifests[args.groups[0]]
    d_in = sum(f.embedding_dim for f in m1.sparse_features) + len(m1.dense_features)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "d_in": d_in,
        "mmoe_flops_per_sample": mmoe_flops_per_sample(d_in, 8, [64, 32], [16], 2),
        "cpu": cpu_description(),
        "onednn_gflops": gemm_rate(2.0, onednn=True),
    }
    bf16_archs = [a for a in args.bf16_archs if a in args.archs] if gemm.bf16_native() else []
    if bf16_archs:
        meta["bf16_gflops"] = gemm_rate(2.0, dtype=torch.bfloat16)

    plan = []
    for group in args.groups:
        for arch in args.archs:
            task_sets = (
                [[t] for t in manifests[group].task_names] if arch == "single_task" else [manifests[group].task_names]
            )
            precisions = ["fp32", "bf16"] if arch in bf16_archs else ["fp32"]
            plan += [
                (group, arch, tasks, seed, precision)
                for precision in precisions
                for tasks in task_sets
                for seed in range(args.seeds)
            ]
    args.out.mkdir(parents=True, exist_ok=True)
    # Runs of (group, arch, precision) not in this plan are kept from earlier invocations, so the
    # table can grow one architecture at a time.
    records: list[RunRecord] = []
    previous = args.out / "census.json"
    session = time.strftime("%Y-%m-%dT%H:%M")
    # The speed measurements (the reference, the neighbour) belong to census_group1; an invocation
    # without it only adds quality rows and keeps the earlier session's speed figures.
    measures_speed = args.fresh or not previous.exists() or "census_group1" in args.groups
    if not measures_speed:
        meta = json.loads(previous.read_text())["meta"]
    else:
        meta["session"], meta["speed_group"] = session, args.groups[0]
    if previous.exists() and not args.fresh:
        planned = {(g, a, p) for g, a, _, _, p in plan}
        records = [
            RunRecord(**r)
            for r in json.loads(previous.read_text())["runs"]
            if (r["group"], r["arch"], r.get("precision", "fp32")) not in planned
        ]
    from reference import beside_neighbour, both, train_reference  # the plain-PyTorch MMoE (imports this module)

    reference_runs = [train_reference(m1, m1.task_names, epochs=1, seed=0)] if measures_speed else []
    for group, arch, tasks, seed, precision in tqdm(plan, desc="census runs", unit="run"):
        rec = run_one(
            manifests[group],
            group,
            arch,
            tasks,
            seed,
            args.epochs,
            CACHE / "runs" / f"{group}-{arch}-{'-'.join(tasks)}-{seed}-{precision}",
            precision,
        )
        rec.session = session
        records.append(rec)
        tqdm.write(
            f"{group} {arch:<13} {precision} seed {seed} {rec.test_auc} best epoch {rec.best_epoch} "
            f"{rec.train_samples_per_s:,.0f} train / {rec.infer_samples_per_s:,.0f} infer samples/s"
        )
        (args.out / "census.json").write_text(
            json.dumps({"meta": meta, "runs": [asdict(r) for r in records]}, indent=1)
        )
    if measures_speed:
        neighbour = CACHE / "census_neighbour_runs"
        quiet = both(m1, m1.task_names, 1, neighbour / "quiet")  # its reference epoch is the "after" measurement
        reference_runs.append(quiet["reference"])
        meta["reference"] = {
            f"{kind}_samples_per_s": statistics.mean(r[f"{kind}_samples_per_s"] for r in reference_runs)
            for kind in ("train", "infer")
        }
        meta["reference_runs"] = reference_runs
        meta["neighbour"] = {"quiet": quiet, "busy": beside_neighbour(m1, m1.task_names, neighbour / "busy")}
    (args.out / "census.json").write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in records]}, indent=1))
    group_tasks = {g: load_spec(g).task_names for g in sorted({r.group for r in records})}
    report = write_report(records, meta, group_tasks)
    (args.out / "census.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
