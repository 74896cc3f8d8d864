"""What the study's scripts share: the two scales (suites), the methods, the lr grids, result-file names.

Suites:
  study  a GPT of 6.50M parameters (hidden 272, 6 layers, 4 heads, vocab 4096, tied embeddings, 128-token
         sequences), 4 workers x 3 sequences per step, 2048 inner steps per worker (3.1M tokens, a third of the stdlib
         corpus), validation every 256 steps on 512 held-out sequences (fp32). Forward and backward run under bf16
         autocast (fp32 parameters, gradients and optimizer states): 0.29 s per step against 0.48 in fp32, measured
         side by side over 128 steps (validation loss 6.4021 vs 6.4044 there), so a run takes ~10 minutes. Lion-family
         weight decay 0.1 (the demo-scale sweep's pick for Lion and both D-Lions; the demo's old 0.5 lost there).
         Local D-Lion's outer betas (0.0, 0.99): the vote is the sign of the round's pseudo-gradient alone (beta2
         then only keeps the momentum state); the demo-scale ablation (results/demo/betas/) gave 5.3667 at lr 4e-3
         against 5.4325 with beta1 0.5 and 5.6550 with the default 0.9 (one seed).
  demo   exactly the demo's scale (distlion_ds/demo.py defaults: hidden 128, 2 layers, 64-token sequences, 4 workers
         x 8 sequences, 300 steps, 256 validation sequences), for the lr x weight-decay sweep the demo takes its
         settings from.

Methods (every one sees the same tokens: worker r reads samples ``(step*N + r)*micro ...`` at every step):
  adamw               DDP fp32 all-reduce + AdamW (betas 0.9/0.95)
  lion                global Lion: DDP fp32 all-reduce + a one-rank DistributedLion (plain Lion)
  dlion_mavo / _avg   DistributedLion, 1-bit votes every step
  local_dlion_H{h}    LocalStepsLion (MaVo) over h steps of AdamW; the lr swept is the outer lr
  diloco_fp32_H{h}    DiLoCo (Nesterov 0.9 outer SGD) over h steps of AdamW, fp32 reduce-scatter/all-gather
  diloco_int8_H{h}    the same with int8 codes (block 256) on the wire; diloco_int4_H{h}: int4
Inner AdamW of the local methods: lr INNER_LR (the adamw grid's middle; documented, not tuned per method), wd 0.1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import statistics

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
CKPT_ROOT = HERE.parent.parent / "runs" / "study_ckpt"  # ignored by git: checkpoints are large and temporary


@dataclasses.dataclass(frozen=True)
class Suite:
    """One scale of the study: the model, the batch, the length of a run and the validation cadence."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    seq_length: int
    micro_batch: int  # sequences per worker per step
    steps: int
    valid_every: int  # a multiple of every local-steps H of the suite (replicas are identical only between rounds)
    valid_samples: int
    ckpt_every: int
    workers: int = 4
    vocab_size: int = 4096
    autocast: str | None = None  # "bf16": forward/backward under torch.autocast (fp32 parameters, grads, optimizers)
    lion_wd: float = 0.5  # the Lion family's default weight decay at this scale
    local_betas: tuple[float, float] = (0.9, 0.99)  # local D-Lion's outer betas (LocalStepsLion's default)
    results: pathlib.Path = RESULTS


SUITES = {
    "study": Suite("study", hidden_size=272, num_layers=6, num_heads=4, seq_length=128, micro_batch=3, steps=2048,
                   valid_every=256, valid_samples=512, ckpt_every=256, autocast="bf16", lion_wd=0.1,
                   local_betas=(0.0, 0.99)),
    "demo": Suite("demo", hidden_size=128, num_layers=2, num_heads=4, seq_length=64, micro_batch=8, steps=300,
                  valid_every=100, valid_samples=256, ckpt_every=100, results=RESULTS / "demo"),
}

INNER_LR = 2e-3  # inner AdamW of the local methods: the adamw grid's middle
INNER_WD = 0.1
LION_WD = 0.5  # the demo's Lion / D-Lion weight decay (Lion: ~3-10x smaller lr, larger wd; Chen et al. 2023)
ADAMW_WD = 0.1
LION_LR = 3e-4
LOCAL_LR_PER_STEP = 1.5e-4  # local D-Lion's outer lr grid: H x this in the middle (see lr_grid)

_LOCAL = re.compile(r"^(local_dlion|diloco_fp32|diloco_int8|diloco_int4)_H(\d+)$")


def parse_method(name: str) -> dict:
    """The method's spec: ``{"kind", "H", "quantization"}``; a ValueError names the allowed forms."""
    if name in ("adamw", "lion", "dlion_mavo", "dlion_avg"):
        return {"kind": name, "H": 1, "quantization": None}
    m = _LOCAL.match(name)
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"--method {name!r}: expected adamw, lion, dlion_mavo, dlion_avg, local_dlion_H<h>, "
                         "diloco_fp32_H<h>, diloco_int8_H<h> or diloco_int4_H<h>")
    kind, h = m.group(1), int(m.group(2))
    quant = {"diloco_int8": "int8", "diloco_int4": "int4"}.get(kind)
    return {"kind": "local_dlion" if kind == "local_dlion" else "diloco", "H": h, "quantization": quant}


def default_wd(method: str, suite: Suite | None = None) -> float:
    """The weight decay a method uses unless a run names another (local methods: the inner AdamW's)."""
    kind = parse_method(method)["kind"]
    lion_wd = LION_WD if suite is None else suite.lion_wd
    return {"adamw": ADAMW_WD, "lion": lion_wd, "dlion_mavo": lion_wd, "dlion_avg": lion_wd}.get(kind, INNER_WD)


def fmt(x: float) -> str:
    """A number as it appears in file names: ``2e-3`` -> ``0.002``, ``0.7`` -> ``0.7`` (repr of the float)."""
    return repr(float(x))


def run_name(method: str, lr: float, seed: int, wd: float | None = None, suite: Suite | None = None) -> str:
    """``<method>_lr<X>_s<S>``, with ``_wd<W>`` when the weight decay is not the method's default at ``suite``."""
    wd_part = "" if wd is None or math.isclose(wd, default_wd(method, suite)) else f"_wd{fmt(wd)}"
    return f"{method}_lr{fmt(lr)}{wd_part}_s{seed}"


def result_path(suite: Suite, method: str, lr: float, seed: int, wd: float | None = None) -> pathlib.Path:
    return suite.results / f"{run_name(method, lr, seed, wd, suite)}.json"


# The study's grids: 3 points per method, the middle one first in the plan. Lion-family: first around the demo's
# 3e-4-ish Lion lr (3e-4 / 1.5e-4 / 6e-4); at 3e-4 and 1.5e-4 (seed 0) Lion gave 4.1194 / 4.0144 and D-Lion MaVo
# 4.1902 / 4.1155, best at the grid's low end twice, so the grid moved down one point before any 6e-4 run:
# 1.5e-4 in the middle, half and twice that.
# Local D-Lion moves every weight by +-lr once per round: the middle is H x LOCAL_LR_PER_STEP.
# It was H x LION_LR (the largest drift per-step Lion could make in H steps; the demo-scale sweep's best for H=10 was
# 4e-3 = H x its Lion lr 4e-4); at H=32 here (betas (0, 0.99), seed 0) 9.6e-3 gave 4.8055 and 4.8e-3 4.7066, so
# the grid moved down one point to bracket the best: H x 1.5e-4 in the middle, half and twice that.
# DiLoCo (Nesterov 0.9: a steady step is 10x lr x the pseudo-
# gradient): the demo-scale sweep at H=10 bracketed its best at 0.2 (0.1: 5.53, 0.2: 5.45, 0.4: 5.71, 0.7: 5.98),
# far below the paper's 0.7 at H=500, so H <= 8 is swept around 0.2 and longer rounds around 0.4 (up to 0.7).
def lr_grid(method: str) -> list[float]:
    """Three learning rates, middle first (the run that decides the targets), then low, then high."""
    spec = parse_method(method)
    if spec["kind"] == "adamw":
        mid, lo, hi = 2e-3, 1e-3, 4e-3
    elif spec["kind"] in ("lion", "dlion_mavo", "dlion_avg"):
        mid, lo, hi = 1.5e-4, 7.5e-5, 3e-4
    elif spec["kind"] == "local_dlion":
        mid = spec["H"] * LOCAL_LR_PER_STEP
        lo, hi = mid / 2, mid * 2
    elif spec["H"] <= 8:
        mid, lo, hi = 0.2, 0.1, 0.4
    else:
        mid, lo, hi = 0.4, 0.2, 0.7
    return [float(f"{v:.4g}") for v in (mid, lo, hi)]


def method_results(suite: Suite, method: str, lrs: list[float], seeds: tuple[int, ...] | None = None) -> list[dict]:
    """``{"lr", "seed", "final_val_loss"}`` of every run of ``method`` at ``lrs`` whose result file exists; ``seeds``:
    by default SEEDS and the method's EXTRA_SEEDS."""
    if seeds is None:
        seeds = (*SEEDS, *EXTRA_SEEDS.get(method, ()))
    out = []
    for lr in lrs:
        for seed in seeds:
            p = result_path(suite, method, lr, seed, default_wd(method, suite))
            if p.exists():
                out.append({"lr": lr, "seed": seed, "final_val_loss": json.loads(p.read_text())["final_val_loss"]})
    return out


def seed0_losses(suite: Suite, method: str, lrs: list[float]) -> dict[float, float]:
    """The final validation loss of every seed-0 run of ``method`` at ``lrs`` whose result file exists."""
    return {r["lr"]: r["final_val_loss"] for r in method_results(suite, method, lrs, seeds=(SEEDS[0],))}


MAX_GRID_EXTENSIONS = 2  # points the plan may add past one end of a method's grid


def study_grid(suite: Suite, method: str) -> list[float]:
    """``lr_grid(method)``, then the points the plan added past an edge, in the order added.

    Once every point has a seed-0 result and the best of them is the lowest (highest) lr, the optimum may lie beyond
    the grid: the point one grid step further (the ratio between the edge and its neighbour) joins the grid, at most
    ``MAX_GRID_EXTENSIONS`` times. Derived from the result files alone, so the plan and the report agree.
    """
    grid = lr_grid(method)
    for _ in range(MAX_GRID_EXTENSIONS):
        losses = seed0_losses(suite, method, grid)
        if len(losses) < len(grid):
            return grid
        ordered = sorted(grid)
        best = min(losses, key=losses.get)
        if best == ordered[0]:
            grid.append(float(f"{ordered[0] ** 2 / ordered[1]:.4g}"))
        elif best == ordered[-1]:
            grid.append(float(f"{ordered[-1] ** 2 / ordered[-2]:.4g}"))
        else:
            break
    return grid


STUDY_METHODS = ["adamw", "lion", "dlion_mavo", "dlion_avg",
                 *[f"local_dlion_H{h}" for h in (8, 32, 128)],
                 *[f"diloco_fp32_H{h}" for h in (8, 32, 128)],
                 *[f"diloco_int8_H{h}" for h in (8, 32, 128)]]
OPTIONAL_METHODS = [f"diloco_int4_H{h}" for h in (8, 32, 128)]
SEEDS = (0, 1)
# Seeds beyond SEEDS, at the best lr only (``best_lr``): global Lion's two seeds differed by 0.31 nats
# (4.0144 / 4.3291), more than D-Lion MaVo's gap to it, so that comparison (the seed paper's claim) gets a third seed.
EXTRA_SEEDS = {"lion": (2,), "dlion_mavo": (2,)}


def best_lr(runs: list[dict]) -> float | None:
    """The lr with the lowest mean final validation loss over the seeds that every lr of the method was run with.

    ``runs``: result dicts (``lr``, ``seed``, ``final_val_loss``) of one method. Comparing on the shared seeds only,
    an lr with an extra, unlucky seed does not lose to an lr run once (the plan runs seed 1 at the seed-0 best
    first); once every lr has seeds 0 and 1, their means decide, not one lucky seed 0.
    """
    by_lr: dict[float, dict[int, float]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], {})[r.get("seed", 0)] = r["final_val_loss"]
    if not by_lr:
        return None
    common = set.intersection(*(set(v) for v in by_lr.values()))
    return min(by_lr, key=lambda lr: statistics.fmean(by_lr[lr][s] for s in common) if common
               else statistics.fmean(by_lr[lr].values()))


# The demo-scale sweep: lr x wd for the demo's methods and local D-Lion, seed 0, 300 steps. The demo's own
# weight decay comes first. Local D-Lion uses H=10, not 8: 10 divides the demo's 300 steps and its validation
# cadence, so the replicas are identical where the loss is measured. Its outer lr moves every weight by +-lr once
# per round, so the grid reaches H x the inner AdamW lr (the most an inner run could drift in a round). DiLoCo at
# the same H on the same tokens gives the local-steps comparison at this scale too.
DEMO_GRID = {
    "adamw": ([1e-3, 2e-3, 4e-3, 8e-3], [0.1, 0.0]),
    "lion": ([2e-4, 4e-4, 8e-4, 1.6e-3], [0.5, 0.1]),
    "dlion_mavo": ([2e-4, 4e-4, 8e-4, 1.6e-3], [0.5, 0.1]),
    "dlion_avg": ([2e-4, 4e-4, 8e-4, 1.6e-3], [0.5, 0.1]),
    "local_dlion_H10": ([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2], [0.1]),
    "diloco_fp32_H10": ([0.1, 0.2, 0.4, 0.7, 1.0], [0.1]),
    "diloco_int8_H10": ([0.7], [0.1]),
}
