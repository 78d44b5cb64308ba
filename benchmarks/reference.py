"""The project's MMoE against the same model written the obvious way in plain PyTorch.

    make bench-reference        # or: python benchmarks/reference.py [--epochs 2]

Census-income group 1 (`census_group1`), identical inputs and split (the project's dataset,
decoded once into tensors), the issue's shapes: MMoE with 8 experts [64, 32], towers [16],
embedding dim 8, softmax gates, batch 1024, Adam.

* **reference**: one `nn.Embedding` per feature, the experts as batched matmuls (`baddbmm` over
  stacked weights), one `nn.Linear` gate per task, `nn.Sequential` towers, Adam over every
  parameter (dense embedding gradients), a loader that indexes the tensors with a random
  permutation. What a competent engineer writes in an afternoon.
* **project**: `recsys_moe.training.trainer.train` (TorchRec's fused embedding bags with FBGEMM's
  fused Adagrad, the first layer taken through the table's rows, the project's loader building
  KeyedJaggedTensors, its thread governor), and its inference path (`MultiTaskRanker.predict` on
  KJT batches of 8192).

Both train the same number of epochs on the same rows, then score the test split in alternating
passes; training samples/s are each one's own epochs' mean (validation excluded), scoring rows/s
each one's median pass. The ratio columns divide the project's figure by the reference's,
measured in the same round. The dense-GEMM bound is the MMoE's dense FLOPs per sample (forward +
backward) at the fp32 `torch.mm` rate measured just before and after the round. The last rows
repeat training beside a process spinning one core. One trainer then runs short epochs on the
plain lookup and on rows by turns, for the speed of one against the other. Where the CPU has bf16 instructions, each
round trains the project once more with `train.precision=bf16`, and one trainer then runs short
fp32 and bf16 epochs by turns for the speed of one against the other. Needs ../shared/data/census-income.
Writes benchmarks/results/reference.md and reference.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from census import (
    CACHE,
    DATA,
    MODEL,
    RESULTS,
    cpu_description,
    gemm_rate,
    mmoe_flops_per_sample,
    scoring_model,
    scoring_pass,
)
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from recsys_moe.allocator import retain_freed_memory
from recsys_moe.config import RunConfig, load_config
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.features import load_spec
from recsys_moe.kernels import gemm
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.build import build
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training.metrics import auc
from recsys_moe.training.trainer import train

BATCH, INFER_BATCH, EXPERTS, HIDDEN, TOWER, DIM = 1024, 8192, 8, (64, 32), 16, 8
INFER_PASSES = 5  # alternating scoring passes per round


class PlainMMoE(nn.Module):
    def __init__(self, table_rows: list[int], n_dense: int, tasks: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(rows, DIM) for rows in table_rows)
        d_in = DIM * len(table_rows) + n_dense
        dims = [d_in, *HIDDEN]
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn(EXPERTS, a, b) / a**0.5) for a, b in itertools.pairwise(dims)
        )
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(EXPERTS, 1, b)) for b in dims[1:])
        self.gates = nn.ModuleList(nn.Linear(d_in, EXPERTS) for _ in range(tasks))
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN[-1], TOWER), nn.ReLU(), nn.Linear(TOWER, 1)) for _ in range(tasks)
        )

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = torch.cat([emb(ids[:, i]) for i, emb in enumerate(self.embeddings)] + [dense], dim=1)
        h = x.unsqueeze(0).expand(EXPERTS, -1, -1)
        for w, b in zip(self.w, self.b):
            h = torch.relu(torch.baddbmm(b, h, w))  # [E, B, H]
        logits = []
        for gate, tower in zip(self.gates, self.towers):
            g = torch.softmax(gate(x), dim=1)  # [B, E]
            mixed = torch.einsum("be,ebh->bh", g, h)
            logits.append(tower(mixed).squeeze(1))
        return torch.stack(logits, dim=1)


def tensors(manifest: Manifest, split: str, tasks: list[str]) -> InMemoryDataset:
    keys = [f.name for f in manifest.sparse_features]
    return InMemoryDataset.from_split(manifest, split, keys, tasks)


def fit_reference(manifest: Manifest, tasks: list[str], epochs: int, seed: int) -> tuple[PlainMMoE, list[float]]:
    """The plain model trained for `epochs`, and each epoch's samples/s."""
    torch.manual_seed(seed)
    data = tensors(manifest, "train", tasks)
    model = PlainMMoE([f.num_embeddings for f in manifest.sparse_features], data.dense.shape[1], len(tasks))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    rates = []
    for _ in range(epochs):
        model.train()
        order, start = torch.randperm(len(data)), time.perf_counter()
        for i in range(0, len(data), BATCH):
            idx = order[i : i + BATCH]
            loss = F.binary_cross_entropy_with_logits(model(data.ids[idx], data.dense[idx]), data.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(len(data) / (time.perf_counter() - start))
    model.eval()
    with torch.no_grad():
        for i in range(0, 2 * INFER_BATCH, INFER_BATCH):  # warm up
            model(data.ids[i : i + INFER_BATCH], data.dense[i : i + INFER_BATCH])
    return model, rates


def reference_pass(model: PlainMMoE, test: InMemoryDataset) -> tuple[float, torch.Tensor]:
    """Seconds to score the test split once in batches of 8192, and the scores [N, T]."""
    with torch.no_grad():
        start = time.perf_counter()
        scores = torch.cat(
            [
                torch.sigmoid(model(test.ids[i : i + INFER_BATCH], test.dense[i : i + INFER_BATCH]))
                for i in range(0, len(test), INFER_BATCH)
            ]
        )
    return time.perf_counter() - start, scores


def reference_summary(
    rates: list[float], seconds: list[float], scores: torch.Tensor, test: InMemoryDataset, tasks: list[str]
) -> dict[str, Any]:
    """Training samples/s (the epochs' mean), scoring rows/s (the median pass), test AUCs."""
    return {
        "train_samples_per_s": sum(rates) / len(rates),
        "infer_samples_per_s": len(test) / statistics.median(seconds),
        "test_auc": {t: auc(scores[:, j], test.labels[:, j]) for j, t in enumerate(tasks)},
    }


def train_reference(manifest: Manifest, tasks: list[str], epochs: int, seed: int) -> dict[str, Any]:
    """The plain model's training and scoring speed (one pass) and its test AUCs."""
    model, rates = fit_reference(manifest, tasks, epochs, seed)
    test = tensors(manifest, "test", tasks)
    seconds, scores = reference_pass(model, test)
    return reference_summary(rates, [seconds], scores, test, tasks)


def train_project(
    manifest: Manifest, tasks: list[str], epochs: int, seed: int, workdir: Path, precision: str = "fp32"
) -> tuple[dict[str, Any], RunConfig, Path]:
    """The project's training speed and test AUCs; its config and best model for scoring."""
    overrides = [*MODEL, "model.arch=mmoe", f"train.seed={seed}", f"train.epochs={epochs}", "train.patience=99"]
    overrides += [f"train.precision={precision}"]
    overrides += [f"train.checkpoint_dir={workdir}", "tracking.enabled=false", f"train.tasks=[{','.join(tasks)}]"]
    config = load_config(None, overrides)
    result = train(manifest, config, progress=False)
    summary = {
        "train_samples_per_s": result.train_samples_per_s,
        "test_auc": {t: result.test.metrics[t]["auc"] for t in tasks},
    }
    return summary, config, result.model_dir


def both(manifest: Manifest, tasks: list[str], epochs: int, workdir: Path, infer_passes: int = 1) -> dict[str, Any]:
    """The reference trains, then the project; then both score the test split in alternating
    passes (the reference's, then the project's, `infer_passes` times) and each keeps its median
    pass: the VM's speed drifts within a minute, and alternating lets the drift hit both alike."""
    threads = torch.get_num_threads()
    ref_model, ref_rates = fit_reference(manifest, tasks, epochs, seed=0)
    torch.set_num_threads(threads)
    project, config, model_dir = train_project(manifest, tasks, epochs, 0, workdir)
    torch.set_num_threads(threads)
    test = tensors(manifest, "test", tasks)
    model, batches = scoring_model(manifest, config, model_dir, tasks)
    ref_seconds, proj_seconds = [], []
    for _ in range(infer_passes):
        seconds, scores = reference_pass(ref_model, test)
        ref_seconds.append(seconds)
        proj_seconds.append(scoring_pass(model, batches))
    project["infer_samples_per_s"] = len(test) / statistics.median(proj_seconds)
    return {"reference": reference_summary(ref_rates, ref_seconds, scores, test, tasks), "project": project}


def beside_neighbour(manifest: Manifest, tasks: list[str], workdir: Path) -> dict[str, Any]:
    """One epoch of each beside a process spinning one core."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        return both(manifest, tasks, 1, workdir)
    finally:
        neighbour.kill()
        neighbour.wait()


def alternating_steps(
    manifest: Manifest,
    tasks: list[str],
    workdir: Path,
    extra: list[str],
    switch: Callable[[Any, bool], None],
    pairs: int = 15,
) -> list[float]:
    """Step time with `switch(engine, False)` / with `switch(engine, True)`, `pairs` times: one
    trainer, short epochs (40 steps) run each way by turns. Whole runs minutes apart differ by
    this VM's drift (tens of percent) more than two settings do; alternating within a second or
    two lets the drift hit both alike."""
    from recsys_moe.training.checkpoint import Progress
    from recsys_moe.training.trainer import LocalEngine

    overrides = [*MODEL, "model.arch=mmoe", "train.max_steps_per_epoch=40", *extra]
    overrides += [f"train.checkpoint_dir={workdir}", "tracking.enabled=false", f"train.tasks=[{','.join(tasks)}]"]
    engine = LocalEngine(manifest, load_config(None, overrides), progress_bar=False)

    def seconds(on: bool) -> float:
        switch(engine, on)
        start = time.perf_counter()
        engine.train_epoch(0, Progress(), bar=False)
        return time.perf_counter() - start

    seconds(False), seconds(True)  # warm up both
    return [seconds(False) / seconds(True) for _ in range(pairs)]


def _set_bf16(engine: Any, on: bool) -> None:
    engine.bf16 = on  # off: the default fp32 step (on rows where they apply)


def _set_rows(engine: Any, on: bool) -> None:
    engine.rows_apply = on  # off: the plain lookup and first-layer GEMMs


def measured_round(manifest: Manifest, tasks: list[str], epochs: int, workdir: Path, flops: float) -> dict[str, Any]:
    """`both`, with the GEMM rates measured just before and after it: the bound of this round; and
    where the CPU has bf16 instructions, the project once more with `train.precision=bf16`."""
    before = gemm_rate(1.0), gemm_rate(1.0, onednn=True)
    result = both(manifest, tasks, epochs, workdir, infer_passes=INFER_PASSES)
    if gemm.bf16_native():
        threads = torch.get_num_threads()
        result["project_bf16"], _, _ = train_project(manifest, tasks, epochs, 0, workdir / "bf16", "bf16")
        torch.set_num_threads(threads)
        result["bf16_gflops"] = gemm_rate(1.0, dtype=torch.bfloat16)
    after = gemm_rate(1.0), gemm_rate(1.0, onednn=True)
    result["gemm_gflops"] = [before[0], after[0]]
    result["onednn_gflops"] = [before[1], after[1]]
    result["bound"] = statistics.mean(result["gemm_gflops"]) * 1e9 / flops  # samples/s
    result["onednn_bound"] = statistics.mean(result["onednn_gflops"]) * 1e9 / flops
    return result


def _bf16_cell(r: dict[str, Any]) -> str:
    if "project_bf16" not in r:
        return "–"
    bf = r["project_bf16"]["train_samples_per_s"]
    return f"{bf:,.0f}, {bf / r['project']['train_samples_per_s']:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="quiet rounds; the table shows the median one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds < 1 or args.epochs < 1:
        parser.error("--rounds and --epochs must be at least 1")
    if not (args.data / "census-income.data.gz").exists():
        print(f"census-income not found at {args.data} (see ../shared/data/census-income/SOURCE.md)", file=sys.stderr)
        return 2
    manifest = build(load_spec("census_group1"), args.data, CACHE / "census_group1", progress=False)
    # The project's trainer keeps freed memory in the process (a process-wide malloc setting,
    # recsys_moe/allocator.py): set here, so that the reference runs under it too, every round.
    retain_freed_memory()
    tasks = manifest.task_names
    d_in = sum(f.embedding_dim for f in manifest.sparse_features) + len(manifest.dense_features)
    flops = mmoe_flops_per_sample(d_in, EXPERTS, list(HIDDEN), [TOWER], len(tasks))
    # Sanity: the plain model's shapes are the project's (same inputs, same dense part).
    project_params = sum(
        p.numel() for p in MultiTaskRanker(manifest, load_config(None, MODEL).model, tasks).parameters()
    )
    # This VM's speed drifts by tens of percent within minutes: several rounds, each the reference
    # and then the project between two GEMM-rate measurements, and the table shows the round with
    # the median training ratio.
    rounds = [
        measured_round(manifest, tasks, args.epochs, CACHE / "reference_runs", flops)
        for _ in tqdm(range(args.rounds), desc="rounds", unit="round")
    ]
    ratio = lambda r: r["project"]["train_samples_per_s"] / r["reference"]["train_samples_per_s"]  # noqa: E731
    share = lambda r, side="project": r[side]["train_samples_per_s"] / r["bound"]  # noqa: E731
    quiet = sorted(rounds, key=ratio)[len(rounds) // 2]
    busy = beside_neighbour(manifest, tasks, CACHE / "reference_runs_busy")
    rows_pairs = alternating_steps(manifest, tasks, CACHE / "reference_runs_rows", [], _set_rows)
    bf16_pairs = []
    if gemm.bf16_native():
        bf16_pairs = alternating_steps(
            manifest, tasks, CACHE / "reference_runs_bf16", ["train.precision=bf16"], _set_bf16
        )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "rounds": args.rounds,
        "infer_passes": INFER_PASSES,
        "d_in": d_in,
        "dense_flops_per_sample": flops,
        "cpu": cpu_description(),
        "project_parameters": project_params,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "quiet": quiet,
                "rounds": rounds,
                "neighbour": busy,
                "rows_step_ratios": rows_pairs,
                "bf16_step_ratios": bf16_pairs,
            },
            indent=1,
        )
    )
    q, b = quiet, busy
    fmt = lambda x: f"{x:,.0f}"  # noqa: E731
    mm, dnn = q["gemm_gflops"], q["onednn_gflops"]
    lines = [
        "# The project's MMoE against a plain-PyTorch MMoE",
        "",
        f"Measured {meta['date']} by `benchmarks/reference.py`: census-income group 1, the same inputs and split "
        f"(d_in {d_in}), MMoE 8 experts [64, 32], towers [16], embedding dim 8, batch 1024, {args.epochs} epochs, "
        f"{meta['threads']} threads. Every figure is from this one run; ratios are project / reference.",
        "",
        f"The dense-GEMM bound is {flops / 1e3:,.1f} kFLOP per training sample (forward and backward) at the "
        "`torch.mm` rate measured just before and just after the round, on a [2048, 1024] x [1024, 1024] "
        f"product: in the round shown, {mm[0]:,.0f} and {mm[1]:,.0f} GFLOP/s, a bound of {q['bound']:,.0f} "
        f"samples/s. The project's expert block runs its GEMMs in oneDNN ({meta['cpu']}), whose rate on the same "
        f"matrices was {dnn[0]:,.0f} and {dnn[1]:,.0f} GFLOP/s: a bound of {q['onednn_bound']:,.0f} samples/s.",
        "",
        "The bound counts the plain model's FLOPs, and the project's step does not run them all: census's "
        "features are single ids into one packed table of few rows, so the trainer takes the first layer "
        "through the table (`train.first_layer_on_rows`, on by default where it applies; "
        "`recsys_moe/kernels/projected.py`). Each table row is multiplied by its feature's slice of the first "
        "layer once per step and a sample's first-layer output is the sum of its rows: the same model up to "
        "float rounding (`tests/test_projected.py`), with the first layer's work done per row instead of per "
        "sample. Measured by turns in one trainer, 40-step epochs on the plain lookup and on rows alternately, "
        f"{len(rows_pairs)} pairs: a step on rows is **{statistics.median(rows_pairs):.2f}x** as fast (median "
        f"of the pairs' ratios; range {min(rows_pairs):.2f}-{max(rows_pairs):.2f}).",
        "",
        "| | reference | project | project / reference |",
        "|---|---:|---:|---:|",
        f"| training samples/s | {fmt(q['reference']['train_samples_per_s'])} | {fmt(q['project']['train_samples_per_s'])} "
        f"| {ratio(q):.2f} |",
        f"| training, share of the dense-GEMM bound | {share(q, 'reference'):.0%} | {share(q):.0%} | |",
        f"| training, share of the oneDNN-GEMM bound | {q['reference']['train_samples_per_s'] / q['onednn_bound']:.0%} "
        f"| {q['project']['train_samples_per_s'] / q['onednn_bound']:.0%} | |",
        f"| inference rows/s (test split, batches of 8192; median of {INFER_PASSES} alternating passes) "
        f"| {fmt(q['reference']['infer_samples_per_s'])} | {fmt(q['project']['infer_samples_per_s'])} "
        f"| {q['project']['infer_samples_per_s'] / q['reference']['infer_samples_per_s']:.2f} |",
    ]
    lines += [
        f"| test AUC {t} | {q['reference']['test_auc'][t]:.4f} | {q['project']['test_auc'][t]:.4f} | |" for t in tasks
    ]
    if "project_bf16" in q:
        bf = q["project_bf16"]
        bf16_bound = q["bf16_gflops"] * 1e9 / flops
        lines += [
            f"| training samples/s, `train.precision=bf16` | | {fmt(bf['train_samples_per_s'])} "
            f"| {bf['train_samples_per_s'] / q['reference']['train_samples_per_s']:.2f} |",
            f"| the same, share of the bf16 `torch.mm` bound ({q['bf16_gflops']:,.0f} GFLOP/s) | "
            f"| {bf['train_samples_per_s'] / bf16_bound:.0%} | |",
            *(f"| test AUC {t}, `train.precision=bf16` | | {bf['test_auc'][t]:.4f} | |" for t in tasks),
        ]
    lines += [
        f"| training samples/s beside a spinning neighbour (1 epoch) | {fmt(b['reference']['train_samples_per_s'])} "
        f"| {fmt(b['project']['train_samples_per_s'])} "
        f"| {b['project']['train_samples_per_s'] / b['reference']['train_samples_per_s']:.2f} |",
        f"| slowdown beside the neighbour (quiet / busy) "
        f"| {q['reference']['train_samples_per_s'] / b['reference']['train_samples_per_s']:.2f}x "
        f"| {q['project']['train_samples_per_s'] / b['project']['train_samples_per_s']:.2f}x | |",
        "",
        "The reference trains its embeddings with Adam on dense gradients; the project with FBGEMM's fused "
        "Adagrad on the rows a batch touches, so the AUCs are of two honest setups, not one optimiser.",
        "",
        *(
            [
                "The bf16 rows train the project once more in the same round with `train.precision=bf16` (the "
                "first expert layer's GEMMs on bf16 operands, all else fp32). They are not measured against the "
                "fp32 bound above, which bf16 products are not held to, but against bf16 `torch.mm`'s rate, "
                "measured after that run. Two whole runs minutes apart differ by this VM's drift more than by "
                "the precision (the bf16 column of the rounds below), so the speed of bf16 against fp32 is "
                "measured by turns in one trainer: "
                + (
                    f"40-step epochs in fp32 (on rows) and in bf16 (the plain path, whose first-layer GEMMs bf16 "
                    f"products are) alternately, {len(bf16_pairs)} pairs: a bf16 step is "
                    f"**{statistics.median(bf16_pairs):.2f}x** as fast (median of the pairs' ratios; "
                    f"range {min(bf16_pairs):.2f}-{max(bf16_pairs):.2f})."
                    if bf16_pairs
                    else "not run."
                ),
                "",
            ]
            if "project_bf16" in q
            else []
        ),
        f"The quiet rows are the median of {len(rounds)} rounds by training ratio. Each round: the GEMM rates, "
        "the reference's training, the project's, both scoring the test split in alternating passes, the GEMM "
        "rates again. Every round:",
        "",
        "| round | `torch.mm` GFLOP/s | oneDNN GFLOP/s | training samples/s, reference → project | ratio "
        "| share of the `torch.mm` bound | inference ratio | bf16: samples/s, × fp32 |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
        *(
            f"| {i} | {r['gemm_gflops'][0]:,.0f}, {r['gemm_gflops'][1]:,.0f} "
            f"| {r['onednn_gflops'][0]:,.0f}, {r['onednn_gflops'][1]:,.0f} "
            f"| {fmt(r['reference']['train_samples_per_s'])} → {fmt(r['project']['train_samples_per_s'])} "
            f"| {ratio(r):.2f} | {share(r):.0%} "
            f"| {r['project']['infer_samples_per_s'] / r['reference']['infer_samples_per_s']:.2f} "
            f"| {_bf16_cell(r)} |"
            for i, r in enumerate(rounds, 1)
        ),
    ]
    (args.out / "reference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
