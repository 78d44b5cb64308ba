"""Training next to a CPU-bound neighbour: the thread governor against fixed thread counts.

    python benchmarks/threads.py            # ~3 min on 2 cores
    python benchmarks/threads.py --quick    # smoke run, prints only

The same short training run (`recsys-moe train` on the synthetic set, three epochs of at most
--steps batches, no tracking), three thread settings, each quiet and then beside a neighbour
process that spins one core (`while True: pass`, what a busy Airflow worker or a build looks
like to us):

* `fixed all cores`: torch's own default, what `train.threads` unset used to mean;
* `fixed 1`;
* `governor`: the default now (`recsys_moe/threads.py`): the cores this process may use, less
  what others keep busy, re-checked every 2 s.

Samples/s is the run's own figure (its epochs' mean, validation excluded). The slowdown column is
quiet / with neighbour for the same setting; the fair share of a 2-core host with one spinning
neighbour is 2 of 3 runnable threads, a slowdown of 1.5x at worst. Writes benchmarks/results/threads.md and threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
CLI = Path(sys.executable).parent / "recsys-moe"


def dataset(impressions: int) -> Path:
    root = CACHE / f"synthetic_{impressions}"
    if not (root / "ds" / "manifest.json").exists():
        print(f"generating {impressions:,} synthetic impressions and building features ...", flush=True)
        subprocess.run([CLI, "generate", root / "raw", "--impressions", str(impressions)], check=True)
        subprocess.run(
            [CLI, "pipeline", "--spec", "synthetic", "--data", root / "raw", "--out", root / "ds"],
            check=True,
            capture_output=True,
        )
    return root / "ds"


def train(data: Path, steps: int, threads: int | None, workdir: Path) -> float:
    args = [CLI, "train", "--data", data, "--no-tracking", "--checkpoint-dir", workdir]
    args += ["--set", "train.epochs=3", "--set", "train.patience=3", "--set", f"train.max_steps_per_epoch={steps}"]
    env = {k: v for k, v in os.environ.items() if k != "RECSYS_MOE_THREADS"}
    if threads is not None:
        args += ["--set", f"train.threads={threads}"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    match = re.search(r"training throughput: ([\d,]+) samples/s", out)
    assert match, out[-2000:]
    return float(match[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--impressions", type=int, default=400_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.impressions = 100, 60_000
    data = dataset(args.impressions)
    cores = len(os.sched_getaffinity(0))
    settings: list[tuple[str, int | None]] = [(f"fixed {cores} (all cores)", cores), ("fixed 1", 1), ("governor", None)]
    rows: list[dict[str, Any]] = []
    work = CACHE / "threads_runs"
    for label, threads in settings:
        quiet = train(data, args.steps, threads, work / "quiet")
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            busy = train(data, args.steps, threads, work / "busy")
        finally:
            neighbour.kill()
            neighbour.wait()
        rows.append({"setting": label, "quiet": quiet, "neighbour": busy, "slowdown": quiet / busy})
        print(
            f"{label:<22} quiet {quiet:>9,.0f}  with neighbour {busy:>9,.0f}  slowdown {quiet / busy:.2f}x", flush=True
        )
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "cores": cores, "steps": args.steps, "machine": platform.processor()}
    (RESULTS / "threads.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    best_quiet = max(r["quiet"] for r in rows)
    lines = [
        "# Training beside a CPU-bound neighbour: thread settings",
        "",
        f"Measured {meta['date']} by `benchmarks/threads.py` on {cores} cores: `recsys-moe train` on the synthetic "
        f"set ({args.impressions:,} impressions), three epochs of at most {args.steps} batches of 1024, no tracking; "
        "the neighbour is a process spinning one core. Samples/s is the run's own figure (its epochs' mean); every figure is from "
        "this one run, and the last column is relative to the best quiet figure in it.",
        "",
        "| threads | quiet samples/s | with neighbour | slowdown | with neighbour / best quiet |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['setting']} | {r['quiet']:,.0f} | {r['neighbour']:,.0f} | {r['slowdown']:.2f}x | "
        f"{r['neighbour'] / best_quiet:.2f} |"
        for r in rows
    ]
    lines += [
        "",
        "A fair share of 2 cores beside one spinning process is 2 of 3 runnable threads (slowdown ≤ 1.5x). Fixed at "
        "all cores, every OpenMP barrier waits for a thread the neighbour has displaced; fixed at 1, the quiet "
        "machine is left half idle. The governor (the default) uses every core while the host is quiet and gives "
        "one up while another process keeps it busy.",
    ]
    (RESULTS / "threads.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'threads.md'}")


if __name__ == "__main__":
    main()
