"""Run the study's pending runs in a fixed priority order until a time budget is spent (chunkable across sessions).

    python -m benchmarks.study.plan [--suite study|demo] --budget-minutes 30 [--int4] [--dry-run]
                                    [--lock /tmp/distlion-heavy.lock] [--nice 10]

Order (suite ``study``): AdamW at its middle lr, the whole seed-0 lr sweep of local D-Lion and DiLoCo-fp32 at
H=32 (the first target), DiLoCo-int8 at H=32, that pair's seed-0 best again with seed 1, the sweeps of D-Lion MaVo,
global Lion and AdamW (the second target), that trio's seed-0 bests with seed 1, then the rest of the trio's sweep
with seed 1, ``EXTRA_SEEDS`` at the best lr on the seeds every lr shares (``common.best_lr``, the report's
best), every other method's middle lr, their other lrs, the points a grid gains past an edge
(``common.study_grid``: when a seed-0 sweep's best is its lowest or highest lr); then seed 1, each method's seed-0
best lr first.
Suite ``demo``: the lr x weight-decay grid of
``common.DEMO_GRID`` at the demo's scale, seed 0. A run whose result file exists is skipped; a run that was paused
resumes from its checkpoint. Each run holds ``--lock`` (flock) only while it trains, so other heavy jobs of the
machine interleave between runs; it runs under ``nice``. A run still going when the budget ends pauses at its next
checkpoint (every 256 steps, ~2 minutes) and resumes in the next chunk.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import pathlib
import subprocess
import sys
import time

from benchmarks.study.common import (
    DEMO_GRID,
    EXTRA_SEEDS,
    OPTIONAL_METHODS,
    SEEDS,
    STUDY_METHODS,
    SUITES,
    best_lr,
    default_wd,
    method_results,
    result_path,
    seed0_losses,
    study_grid,
)

logger = logging.getLogger("benchmarks.study.plan")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def planned_runs(suite: str, int4: bool = False) -> list[dict]:
    """Every run of the suite, in priority order: ``{"method", "lr", "seed", "wd"}``."""
    if suite == "demo":
        # Each method's lr sweep at the demo's weight decay first (interleaved over the methods), then the other wd.
        runs = []
        for wi in range(max(len(wds) for _, wds in DEMO_GRID.values())):
            for li in range(max(len(lrs) for lrs, _ in DEMO_GRID.values())):
                for m, (lrs, wds) in DEMO_GRID.items():
                    if wi < len(wds) and li < len(lrs):
                        runs.append({"method": m, "lr": lrs[li], "seed": 0, "wd": wds[wi]})
        return runs
    methods = STUDY_METHODS + (OPTIONAL_METHODS if int4 else [])
    runs: list[dict] = []
    grids = {m: study_grid(SUITES[suite], m) for m in methods}  # lr_grid, plus points added past an edge
    best = {m: _seed0_best(suite, m, grids[m]) for m in methods}

    def add_seed1_best(ms: list[str], seed: int = SEEDS[1]) -> None:  # at the seed-0 best lr (else the middle)
        for m in ms:
            r = {"method": m, "lr": best[m] if best[m] is not None else grids[m][0], "seed": seed}
            if m in methods and r not in runs:
                runs.append(r)

    def add(ms: list[str], which: slice, seed: int = SEEDS[0]) -> None:
        ms = [m for m in ms if m in methods]
        for i in range(max(len(grids[m]) for m in ms))[which]:  # interleaved: every i-th lr before any (i+1)-th
            for m in ms:
                r = {"method": m, "lr": grids[m][i], "seed": seed} if i < len(grids[m]) else None
                if r is not None and r not in runs:
                    runs.append(r)

    # Seed 0, in the order that decides the most per run: AdamW's middle (the inner optimizer's reference), then
    # the whole lr sweep of the H=32 pair of the first target, DiLoCo-int8 at H=32 (its bytes), the sweeps of the
    # second target (D-Lion MaVo vs global Lion vs AdamW), every other method's middle, then their other lrs.
    add(["adamw"], slice(0, 1))
    add(["local_dlion_H32", "diloco_fp32_H32"], slice(None))
    add(["diloco_int8_H32"], slice(0, 1))
    add_seed1_best(["local_dlion_H32", "diloco_fp32_H32"])  # the first target's pair again, seed 1
    trio = ["dlion_mavo", "lion", "adamw"]
    add(trio, slice(None))
    add_seed1_best(trio)  # the second target decided with two seeds,
    add(trio, slice(None), seed=SEEDS[1])  # its whole sweep with seed 1 too, so its best lr is chosen on two seeds
    for m, seeds in EXTRA_SEEDS.items():  # and a third seed where two did not decide it, at the two-seed best
        if m not in methods:
            continue
        results = method_results(SUITES[suite], m, grids[m])
        blr = best_lr(results)  # the report's best
        done = {(r["lr"], r["seed"]) for r in results}
        for seed in seeds:
            for lr in grids[m]:  # one run already at an lr that was the best then stays in the plan
                r = {"method": m, "lr": lr, "seed": seed}
                if ((lr, seed) in done or lr == (blr if blr is not None else grids[m][0])) and r not in runs:
                    runs.append(r)
    add(methods, slice(0, 1))
    add(methods, slice(None))
    # Seed 1: each method at its seed-0 best lr first, then the rest.
    add_seed1_best(methods)
    for s in SEEDS[1:]:
        add(methods, slice(None), seed=s)
    return [dict(r, wd=default_wd(r["method"], SUITES[suite])) for r in runs]


def _seed0_best(suite: str, method: str, grid: list[float] | None = None) -> float | None:
    """The lr of the lowest seed-0 final validation loss among the method's grid runs that exist, or None.

    ``grid``: the method's ``study_grid``, when the caller has it already."""
    s = SUITES[suite]
    found = seed0_losses(s, method, study_grid(s, method) if grid is None else grid)
    return min(found, key=found.get) if found else None


def pending(suite: str, int4: bool = False) -> list[dict]:
    s = SUITES[suite]
    return [r for r in planned_runs(suite, int4)
            if not result_path(s, r["method"], r["lr"], r["seed"], r["wd"]).exists()]


def _run_one(r: dict, suite: str, deadline: float, lock: str | None, nice: int) -> int:
    cmd = ["nice", "-n", str(nice), sys.executable, "-m", "benchmarks.study.run", "--suite", suite,
           "--method", r["method"], "--lr", repr(r["lr"]), "--seed", str(r["seed"]), "--wd", repr(r["wd"]),
           "--deadline-minutes", f"{max(0.0, (deadline - time.time()) / 60):.2f}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    fd = os.open(lock, os.O_CREAT | os.O_RDWR) if lock else None
    try:
        if fd is not None:
            logger.info("waiting for %s", lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        logger.info("%s", " ".join(cmd[3:]))
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="study")
    ap.add_argument("--budget-minutes", type=float, required=True)
    ap.add_argument("--int4", action="store_true", help="add the diloco_int4 runs at the end of each phase")
    ap.add_argument("--dry-run", action="store_true", help="list the pending runs in order and exit")
    ap.add_argument("--lock", default="/tmp/distlion-heavy.lock", help="flock held per run ('' for none)")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--max-runs", type=int, default=None)
    args = ap.parse_args(argv)
    todo = pending(args.suite, args.int4)
    total = len(planned_runs(args.suite, args.int4))
    logger.info("%s: %d of %d runs pending", args.suite, len(todo), total)
    if args.dry_run:
        for r in todo:
            print(f"{r['method']} lr={r['lr']} wd={r['wd']} seed={r['seed']}")
        return 0
    deadline = time.time() + 60 * args.budget_minutes
    done = 0
    while todo := pending(args.suite, args.int4):  # again after every run: a result can extend a grid
        r = todo[0]
        if time.time() > deadline - 60 or (args.max_runs is not None and done >= args.max_runs):
            break
        rc = _run_one(r, args.suite, deadline, args.lock or None, args.nice)
        if rc == 3:
            logger.info("budget spent: %s paused (it resumes from its checkpoint next time)", r["method"])
            break
        if rc != 0:
            logger.error("run %s failed with exit status %d; stopping", r, rc)
            return rc
        if not result_path(SUITES[args.suite], r["method"], r["lr"], r["seed"], r["wd"]).exists():
            logger.error("run %s exited 0 without its result file; stopping", r)
            return 1
        done += 1
    logger.info("%d runs finished in this chunk; %d pending", done, len(pending(args.suite, args.int4)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
