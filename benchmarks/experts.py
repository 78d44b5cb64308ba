"""Expert block speed on CPU: E expert MLPs plus the gate-weighted combine for G = 2 gates,
forward + backward, three ways:

- loop:    a Python loop over E `nn.Sequential(nn.Linear, ReLU, ...)` experts, then `gates.combine`
- stacked: the project's `StackedMLP` + `gates.combine` (fused: one GEMM, then batched GEMMs,
           in-place ReLUs; the combine switches to a per-sample bmm when its temporary is large)
- top2:    `kernels.grouped.topk_experts_combine` with each gate's top-2 experts (renormalised)

    python benchmarks/experts.py            # the full grid, ~6 min on 2 cores
    python benchmarks/experts.py --quick    # smoke run: a small grid, prints only

The grid: experts d_in → 256 → 128 (ReLU after both layers) for E in {4, 8, 16, 64}, batch in
{1024, 8192}, d_in in {128, 512}; plus census-sized experts (64 → 64 → 32, E = 16), where
per-expert dispatch rather than GEMM time dominates the loop. Every method gets the same inputs
and top-2 gate weights (the dense methods compute all experts regardless) and their outputs are
checked against each other. GFLOP/s counts only the FLOPs the method needs: all E experts on every
row for the dense methods; for top2, the routed (row, expert) pairs (the union over the two gates)
and the combine over the non-zero weights; backward counts twice the forward. Each timing is
paired with plain fp32 `torch.mm` calls doing the same number of FLOPs, timed right after it,
because this VM's speed drifts; "vs mm" is the ratio of the two rates. Times are the best of the
reps (other jobs on a shared VM only ever slow a rep down). Writes benchmarks/results/experts.md
and experts.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from recsys_moe.kernels.dense import combine
from recsys_moe.kernels.grouped import topk_experts_combine
from recsys_moe.model.stacked import StackedMLP

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
HIDDEN = (256, 128)
SMALL_HIDDEN = (64, 32)  # the census benchmark's experts
GATES, TOP_K = 2, 2
METHODS = ["loop", "stacked", "top2"]
DENSE = ["loop", "stacked"]
MM_K = 1024  # reference GEMM: [B, 1024] x [1024, n], n <= MM_MAX_N per call
MM_MAX_N = 4096


@dataclass
class Record:
    experts: int
    batch: int
    d_in: int
    hidden: tuple[int, ...]
    method: str
    ms: float  # best forward + backward time over the reps
    reps: int
    gflop: float  # FLOPs the method needs (forward + backward)
    gflops: float  # achieved rate
    mm_gflops: float  # plain torch.mm doing the same FLOPs, timed right after
    routed_per_row: float  # experts computed per row


def block_flops(rows: int, d_in: int, hidden: tuple[int, ...], combine_terms: int) -> float:
    """Forward + backward FLOPs: experts on `rows` (row, expert) pairs, a combine of `combine_terms`
    weighted [H] vectors; backward costs twice the forward (input and weight gradients)."""
    dims = [d_in, *hidden]
    forward = 2 * rows * sum(a * b for a, b in itertools.pairwise(dims)) + 2 * combine_terms * hidden[-1]
    return 3.0 * forward


def timed(fn: Callable[[], None], budget_s: float, max_reps: int) -> tuple[float, int]:
    """Best seconds of fn after one warm-up; at least 2 reps, more while under budget_s."""
    fn()
    times: list[float] = []
    while len(times) < 2 or (len(times) < max_reps and sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), len(times)


def mm_rate(flops: float, batch: int, budget_s: float, max_reps: int) -> float:
    """GFLOP/s of plain fp32 torch.mm calls, [batch, 1024] x [1024, n], totalling `flops`."""
    n_total = max(64, round(flops / (2 * batch * MM_K)))
    calls = math.ceil(n_total / MM_MAX_N)
    n = max(64, round(n_total / calls))
    a, b = torch.randn(batch, MM_K), torch.randn(MM_K, n)

    def run() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    seconds, _ = timed(run, budget_s, max_reps)
    return 2 * batch * MM_K * n * calls / seconds / 1e9


def top2_gates(batch: int, num_experts: int, seed: int) -> torch.Tensor:
    """[B, G, E] gate weights of G independent softmax gates, each keeping its top-2 (renormalised)."""
    logits = torch.randn(batch, GATES, num_experts, generator=torch.Generator().manual_seed(seed))
    top, idx = logits.topk(min(TOP_K, num_experts), dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))


def make_methods(
    num_experts: int, batch: int, d_in: int, hidden: tuple[int, ...]
) -> tuple[dict[str, Callable[[], torch.Tensor]], list[torch.Tensor], float]:
    """One forward closure per method on shared inputs, their leaf tensors, and routed pairs per row."""
    torch.manual_seed(0)
    stacked = StackedMLP(num_experts, d_in, hidden)
    loop = nn.ModuleList()
    for e in range(num_experts):  # same weights as the stacked experts
        layers: list[nn.Module] = []
        for i, (w, b) in enumerate(zip(stacked.weights, stacked.biases)):
            w_e = w[:, e] if i == 0 else w[e]
            linear = nn.Linear(*w_e.shape)
            with torch.no_grad():
                linear.weight.copy_(w_e.t())
                linear.bias.copy_(b[e, 0])
            layers += [linear, nn.ReLU()]
        loop.append(nn.Sequential(*layers))
    x = torch.randn(batch, d_in, requires_grad=True)
    gate_weights = top2_gates(batch, num_experts, seed=1).requires_grad_()
    weights, biases = list(stacked.weights), list(stacked.biases)
    methods = {
        "loop": lambda: combine(torch.stack([expert(x) for expert in loop]), gate_weights),
        "stacked": lambda: combine(stacked(x), gate_weights),
        "top2": lambda: topk_experts_combine(x, weights, biases, gate_weights),
    }
    leaves = [x, gate_weights, *stacked.parameters(), *loop.parameters()]
    routed_per_row = (gate_weights != 0).any(dim=1).sum().item() / batch
    return methods, leaves, routed_per_row


def run_case(
    num_experts: int, batch: int, d_in: int, hidden: tuple[int, ...], budget_s: float, max_reps: int
) -> list[Record]:
    methods, leaves, routed_per_row = make_methods(num_experts, batch, d_in, hidden)
    with torch.no_grad():  # every method computes the same block
        outputs = {name: fn() for name, fn in methods.items()}
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["stacked"], rtol=1e-4, atol=1e-5, msg=f"{name} disagrees")
    grad_out = torch.randn_like(outputs["stacked"])
    del outputs

    records = []
    for name, fn in methods.items():

        def step(fn: Callable[[], torch.Tensor] = fn) -> None:
            for leaf in leaves:
                leaf.grad = None
            fn().backward(grad_out)

        seconds, reps = timed(step, budget_s, max_reps)
        if name == "top2":
            per_row = routed_per_row
            flops = block_flops(round(per_row * batch), d_in, hidden, GATES * min(TOP_K, num_experts) * batch)
        else:
            per_row = num_experts
            flops = block_flops(num_experts * batch, d_in, hidden, GATES * num_experts * batch)
        mm = mm_rate(flops, batch, budget_s / 2, max_reps)
        records.append(
            Record(
                num_experts,
                batch,
                d_in,
                hidden,
                name,
                seconds * 1e3,
                reps,
                flops / 1e9,
                flops / seconds / 1e9,
                mm,
                per_row,
            )
        )
    return records


def _get(records: list[Record], method: str, **case: object) -> Record:
    return next(r for r in records if r.method == method and all(getattr(r, k) == v for k, v in case.items()))


def _verdict(values: list[float], target: float) -> str:
    return "met" if min(values) >= target else "met in some cases" if max(values) >= target else "not met"


def _table(records: list[Record]) -> list[str]:
    lines = [
        "| E | batch | d_in | experts/row (top2) | loop ms | stacked ms | top2 ms "
        "| stacked speedup vs loop | top2 speedup vs fastest dense "
        "| loop GFLOP/s (vs mm) | stacked GFLOP/s (vs mm) | top2 GFLOP/s (vs mm) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e, b, d in sorted({(r.experts, r.batch, r.d_in) for r in records}):
        rec = {m: _get(records, m, experts=e, batch=b, d_in=d) for m in METHODS}
        fastest_dense = min(rec[m].ms for m in DENSE)
        lines.append(
            f"| {e} | {b} | {d} | {rec['top2'].routed_per_row:.2f} | "
            + " | ".join(f"{rec[m].ms:.1f}" for m in METHODS)
            + f" | {rec['loop'].ms / rec['stacked'].ms:.2f}x | {fastest_dense / rec['top2'].ms:.1f}x"
            + "".join(f" | {rec[m].gflops:.0f} ({rec[m].gflops / rec[m].mm_gflops:.0%})" for m in METHODS)
            + " |"
        )
    return lines


def write_report(records: list[Record], meta: dict) -> str:
    main = [r for r in records if r.hidden == HIDDEN]
    small = [r for r in records if r.hidden == SMALL_HIDDEN]
    lines = [
        "# Expert block: loop vs stacked vs top-2 routed (CPU)",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `python benchmarks/experts.py`. {GATES} gates, "
        "forward + backward (gradients w.r.t. the input, the gate weights and every parameter), best of the "
        "reps (2–10, fewer for big cases). All methods get the same input and the same top-2 gate weights "
        "(the dense ones compute every expert anyway) and their outputs agree. GFLOP/s counts only the needed "
        "FLOPs (dense: all experts on every row; top2: the routed (row, expert) pairs, the union over both gates, "
        "listed as experts/row); backward = 2x forward. **vs mm**: the rate as a fraction of fp32 `torch.mm` "
        f"([B, {MM_K}] x [{MM_K}, n], same total FLOPs) timed right after each measurement. loop: a Python loop "
        "over `nn.Linear` experts; stacked (the fused dense path): the project's `StackedMLP` + `gates.combine`; "
        "top2: `grouped.topk_experts_combine`.",
        "",
        f"## Experts d_in → {' → '.join(map(str, HIDDEN))}",
        "",
        *_table(main),
        "",
    ]
    if small:
        lines += [
            f"## Census-sized experts, d_in → {' → '.join(map(str, SMALL_HIDDEN))}",
            "",
            *_table(small),
            "",
        ]
    lines += ["## Targets", ""]
    for label, recs in (("", main), (" (census-sized experts)", small)):
        cases = sorted({(r.batch, r.d_in) for r in recs if r.experts == 16})
        if cases:
            pairs = [tuple(_get(recs, m, experts=16, batch=b, d_in=d) for m in ("loop", "stacked")) for b, d in cases]
            speedups = [loop.ms / stacked.ms for loop, stacked in pairs]
            lines.append(
                f"- Fused (stacked) ≥ 3x the loop at E = 16{label}: {min(speedups):.2f}x–{max(speedups):.2f}x "
                f"over the batch/d_in cases, **{_verdict(speedups, 3)}**."
            )
    for method in ("stacked",):
        ratios = [r.gflops / r.mm_gflops for r in main if r.batch == 8192 and r.method == method]
        if ratios:
            lines.append(
                f"- ≥ 60% of the matmul rate at batch 8192 ({method}): {min(ratios):.0%}–{max(ratios):.0%} over "
                f"E and d_in (median {statistics.median(ratios):.0%}), **{_verdict(ratios, 0.6)}**."
            )
    cases = sorted({(r.batch, r.d_in) for r in main if r.experts == 64})
    if cases:
        cells, speedups = [], []
        for b, d in cases:
            top2 = _get(main, "top2", experts=64, batch=b, d_in=d).ms
            best = min((_get(main, m, experts=64, batch=b, d_in=d) for m in DENSE), key=lambda r: r.ms)
            speedups.append(best.ms / top2)
            cells.append(f"B={b}, d_in={d}: {best.ms / top2:.1f}x (vs {best.method})")
        lines.append(
            f"- Top-2 of 64 experts ≥ 10x faster than dense all-64 (the faster of loop and stacked): "
            f"{'; '.join(cells)}; **{_verdict(speedups, 10)}**."
        )
    loop_vs_mm = [r.gflops / r.mm_gflops for r in main if r.method == "loop"]
    if loop_vs_mm:
        lines.append(
            f"- Why fused is not 3x the loop on this CPU: with d_in → {' → '.join(map(str, HIDDEN))} experts the loop "
            f"already runs at a median {statistics.median(loop_vs_mm):.0%} of the matmul rate (each expert is one "
            "large GEMM), so there is no headroom for fusion to reclaim; fusing removes per-expert dispatch, which "
            "only dominates for small experts (the census-sized table). At large batches the loop even wins: each "
            "expert's [B, h] activations stay in cache, while the stacked layout pays copies of the [E, B, h] "
            "tensors. The 3x target presumes dispatch-bound loops, as on a GPU (see the Triton kernels)."
        )
    mm = [r.mm_gflops for r in records]
    lines += [
        f"- The reference `torch.mm` ran at {min(mm):.0f}–{max(mm):.0f} GFLOP/s (median "
        f"{statistics.median(mm):.0f}) on {meta['threads']} threads over the run.",
        "",
        "Raw numbers: `experts.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid, few reps, print only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="rewrite experts.md from experts.json")
    args = parser.parse_args()
    if args.report_only:
        raw = json.loads((args.out / "experts.json").read_text())
        records = [Record(**{**r, "hidden": tuple(r["hidden"])}) for r in raw["records"]]
        (args.out / "experts.md").write_text(write_report(records, raw["meta"]))
        return 0
    if args.quick:
        grid = [(e, 1024, 128, HIDDEN) for e in (4, 16)] + [(16, 1024, 64, SMALL_HIDDEN)]
        budget_s, max_reps = 0.2, 3
    else:
        grid = [(e, b, d, HIDDEN) for e in (4, 8, 16, 64) for b in (1024, 8192) for d in (128, 512)]
        grid += [(16, b, 64, SMALL_HIDDEN) for b in (1024, 8192)]
        budget_s, max_reps = 1.0, 10
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "hidden": HIDDEN,
        "small_hidden": SMALL_HIDDEN,
        "gates": GATES,
        "top_k": TOP_K,
    }
    records: list[Record] = []
    start = time.perf_counter()
    for e, b, d, hidden in grid:
        case = run_case(e, b, d, hidden, budget_s, max_reps)
        records += case
        cells = "  ".join(f"{r.method} {r.ms:8.1f} ms ({r.gflops / r.mm_gflops:4.0%})" for r in case)
        print(
            f"E={e:<3} B={b:<5} d_in={d:<4} hidden={list(hidden)}  {cells}  [{time.perf_counter() - start:.0f} s]",
            flush=True,
        )
    report = write_report(records, meta)
    print(report)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "experts.md").write_text(report)
        (args.out / "experts.json").write_text(
            json.dumps({"meta": meta, "records": [asdict(r) for r in records]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
