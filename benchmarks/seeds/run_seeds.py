"""Re-measure the seed papers' claims on the tiny GPT (issue 5, "The seeds' claims, re-measured").

    python benchmarks/seeds/run_seeds.py claim1 [--workers 2,4,8] [--steps 150]
    python benchmarks/seeds/run_seeds.py claim2 [--iters 150] [--subset reduced|full]
    python benchmarks/seeds/run_seeds.py claim3 [--iters 150]
    python benchmarks/seeds/run_seeds.py claim4 [--iters 150] [--epoch-samples 160]

claim1: D-Lion MaVo / Avg vs global Lion vs AdamW at N data-parallel workers (arXiv 2404.00438), via
        ``python -m distlion_ds.demo``.
claim2: pipeline p2p compression (TopK / k-bit on activations, gradients, both) on megatron-core GPT, pp=2
        (arXiv 2401.07788).
claim3: TopK-trained vs EF-trained models evaluated with and without compression at inference.
claim4: AQ-SGD with TopK activations at K = 10/30/50 % over several epochs (--epoch-samples cycles the data).

Each subcommand runs its sweep sequentially (one run at a time), writes the compression configs it uses under
benchmarks/seeds/configs/, keeps every run's summary.json under --out (default runs/seeds/<claim>), and prints a
markdown table (also written to <out>/table.md). These are scripts, not tests: they take minutes to hours.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
PY = sys.executable

NONE = {"method": "none"}


def topk(ratio: float, feedback: str = "none") -> dict:
    return {"method": "topk", "ratio": ratio, "feedback": feedback}


def quant(bits: int, feedback: str = "none") -> dict:
    return {"method": "quantize", "bits": bits, "block_size": 256, "feedback": feedback}


def write_config(name: str, activations: dict, gradients: dict, inference: str = "compressed",
                 aqsgd: dict | None = None) -> pathlib.Path:
    cfg = {"activations": activations, "gradients": gradients, "inference": inference}
    if aqsgd is not None:
        cfg["aqsgd"] = aqsgd
    CONFIGS.mkdir(parents=True, exist_ok=True)
    path = CONFIGS / f"{name}.json"
    path.write_text(json.dumps(cfg) + "\n")
    return path


def _rel(p: pathlib.Path) -> str:
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------------------------------- claim 1

def claim1(args) -> str:
    out = pathlib.Path(args.out or "runs/seeds/claim1")
    rows = []
    for n in [int(x) for x in args.workers.split(",")]:
        run_dir = out / f"n{n}"
        cmd = [PY, "-m", "distlion_ds.demo", "--workers", str(n), "--steps", str(args.steps),
               "--methods", args.methods, "--out", str(run_dir)]
        t0 = time.time()
        if (REPO / run_dir / "summary.json").exists() and not args.rerun:
            print("  (cached)", run_dir, flush=True)
            rc = 0
        else:
            print("+", " ".join(cmd[1:]), flush=True)
            rc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL if args.quiet else None,
                                stderr=subprocess.DEVNULL if args.quiet else None).returncode
        summary = json.loads((REPO / run_dir / "summary.json").read_text())
        curves = json.loads((REPO / run_dir / "curves.json").read_text())
        for r in summary["runs"]:
            tail = curves[r["name"]][-10:]
            rows.append((n, r["name"], r["final_val_loss"], statistics.fmean(tail), r["bits_per_param_step"],
                         r["wall_s"], rc))
        print(f"  N={n}: {time.time() - t0:.0f} s, rc={rc}", flush=True)
    lines = [f"steps per run: {args.steps} (micro-batch 8 x seq 64 per worker per step)", "",
             "| N | method | final val loss | train loss (mean last 10) | wire bits/param/step | wall s |",
             "|---|---|---|---|---|---|"]
    for n, name, vl, tl, bits, wall, rc in rows:
        lines.append(f"| {n} | {name} | {vl:.4f} | {tl:.4f} | {bits:.3f} | {wall:.1f} |"
                     + ("" if rc == 0 else f" (rc {rc})"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ megatron helpers

def megatron_args(args) -> list[str]:
    return ["--pipeline-model-parallel-size", "2", "--num-layers", str(args.layers), "--hidden-size",
            str(args.hidden), "--num-attention-heads", "4", "--seq-length", str(args.seq),
            "--micro-batch-size", str(args.micro_batch), "--global-batch-size", str(args.global_batch),
            "--train-iters", str(args.iters), "--optimizer", args.optimizer, "--lr", str(args.lr),
            "--min-lr", str(args.lr / 10), "--lr-warmup-iters", str(max(1, args.iters // 10)),
            "--lr-decay-style", "cosine", "--eval-iters", str(args.eval_iters), "--eval-interval",
            str(args.iters), "--log-interval", str(max(1, args.iters // 5)), "--data-path", args.data,
            "--seed", str(args.seed)]


def run_megatron(args, out: pathlib.Path, config: pathlib.Path | None, extra: list[str] = ()) -> dict:
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(args.port),
           "-m", "distlion_ds.megatron.pretrain_gpt", *megatron_args(args), *extra, "--out", str(out)]
    if config is not None:
        cmd += ["--p2p-compression", _rel(config)]
    if (REPO / out / "summary.json").exists() and not args.rerun:
        print("  (cached)", out, flush=True)
    else:
        print("+", " ".join(cmd[1:]), flush=True)
        log = REPO / out.parent / f"{out.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            print(f"  rc={rc}; see {log}", flush=True)
            return {"rc": rc}
    s = json.loads((REPO / out / "summary.json").read_text())
    s["rc"] = 0
    return s


def _fmt_run(s: dict) -> tuple[str, str, str, str]:
    if s.get("rc"):
        return f"failed (rc {s['rc']})", "", "", ""
    tl = statistics.fmean(s["losses"][-10:])
    vl = s["eval"][-1]["val_loss"] if s["eval"] else float("nan")

    def bpe(key):
        w = s["wire"].get(key)
        return "fp32 (4.000)" if w is None else f"{w['bytes_per_element']:.3f}"
    return f"{tl:.4f}", f"{vl:.4f}", bpe("p2p_activations"), bpe("p2p_gradients")


def _header(args, what: str) -> str:
    return (f"{what}; megatron-core GPT, pp=2 dp=1, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
            f"global batch {args.global_batch} (micro {args.micro_batch}), {args.iters} iterations, "
            f"{args.optimizer} lr {args.lr} cosine to {args.lr / 10}, seed {args.seed}, validation on "
            f"{args.eval_iters} x {args.global_batch} samples at the end")


# ---------------------------------------------------------------------------------------------------- claim 2

def claim2_grid(subset: str) -> list[tuple[str, dict | None]]:
    if subset == "full":
        codecs = [(f"topk{int(r * 100)}", topk(r)) for r in (0.05, 0.1, 0.3, 0.5)] + \
                 [(f"q{b}", quant(b)) for b in (2, 4, 8)]
    else:
        codecs = [("topk10", topk(0.1)), ("topk30", topk(0.3)), ("q4", quant(4)), ("q8", quant(8))]
    grid: list[tuple[str, dict | None]] = [("none", None)]
    for where in ("act", "grad", "both"):
        for name, c in codecs:
            grid.append((f"{where}_{name}", {"activations": c if where in ("act", "both") else NONE,
                                             "gradients": c if where in ("grad", "both") else NONE}))
    return grid


def claim2(args) -> str:
    out = pathlib.Path(args.out or "runs/seeds/claim2")
    rows = []
    for name, cfg in claim2_grid(args.subset):
        if args.only and name not in args.only.split(","):
            continue
        path = write_config(f"c2_{name}", cfg["activations"], cfg["gradients"]) if cfg else None
        s = run_megatron(args, out / name, path)
        rows.append((name, path, s))
    lines = [_header(args, "Pipeline p2p compression, no error feedback, inference compressed as trained"), "",
             "| run | activations | gradients | train loss (mean last 10) | val loss | act bytes/elem | "
             "grad bytes/elem |", "|---|---|---|---|---|---|---|"]
    for name, _path, s in rows:
        where, _, codec = name.partition("_")
        act = codec if where in ("act", "both") else "none"
        grad = codec if where in ("grad", "both") else "none"
        lines.append(f"| {name} | {act} | {grad} | " + " | ".join(_fmt_run(s)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- claim 3

def claim3(args) -> str:
    out = pathlib.Path(args.out or "runs/seeds/claim3")
    r = args.ratio
    rows = []
    for trained, fb in (("topk", "none"), ("topk_ef", "ef")):
        for inference in ("compressed", "uncompressed"):
            name = f"{trained}{int(r * 100)}_infer_{inference}"
            path = write_config(f"c3_{name}", topk(r, fb), NONE, inference=inference)
            rows.append((trained, fb, inference, run_megatron(args, out / name, path)))
    lines = [_header(args, f"TopK {int(r * 100)} % on activations (gradients uncompressed), trained with and "
                           "without error feedback; validation run forward-only with the config's inference switch"),
             "", "Both runs of a pair have the same seed and the same training config except the `inference` "
             "switch, which only touches forward-only traffic: their training losses are compared to show the "
             "training was identical.", "",
             "| trained with | feedback | inference | train loss (mean last 10) | val loss | same training as pair |",
             "|---|---|---|---|---|---|"]
    for i, (_trained, fb, inference, s) in enumerate(rows):
        mate = rows[i ^ 1][3]
        same = ("yes" if s.get("losses") == mate.get("losses") else "NO") if not s.get("rc") else ""
        tl, vl, _, _ = _fmt_run(s)
        lines.append(f"| TopK {int(r * 100)} % | {fb} | {inference} | {tl} | {vl} | {same} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- claim 4

def claim4(args) -> str:
    out = pathlib.Path(args.out or "runs/seeds/claim4")
    extra = ["--epoch-samples", str(args.epoch_samples)]
    epochs = args.iters * args.global_batch / args.epoch_samples
    aq = {"warmup_epochs": 1, "store": "cpu", "path": None}
    runs = [("none", None, NONE)]
    for r in (0.1, 0.3, 0.5):
        runs.append((f"aqsgd_topk{int(r * 100)}", "aqsgd", topk(r, "aqsgd")))
        if args.with_plain:
            runs.append((f"plain_topk{int(r * 100)}", "none", topk(r)))
    rows = []
    for name, fb, act in runs:
        path = None if act is NONE else write_config(f"c4_{name}", act, NONE, inference="uncompressed",
                                                     aqsgd=aq if fb == "aqsgd" else None)
        rows.append((name, fb, act, run_megatron(args, out / name, path, extra)))
    lines = [_header(args, f"AQ-SGD (per-sample activation buffers, warm-up 1 epoch sent in full) with TopK "
                           f"activations, gradients uncompressed; --epoch-samples {args.epoch_samples} = "
                           f"{epochs:.0f} epochs; validation uncompressed"), "",
             "| run | activations | feedback | train loss (mean last 10) | val loss (uncompressed) | "
             "act bytes/elem |", "|---|---|---|---|---|---|"]
    for name, fb, act, s in rows:
        tl, vl, ab, _ = _fmt_run(s)
        codec = "none" if act is NONE else f"TopK {int(act['ratio'] * 100)} %"
        lines.append(f"| {name} | {codec} | {fb or 'none'} | {tl} | {vl} | {ab} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="claim", required=True)
    c1 = sub.add_parser("claim1")
    c1.add_argument("--workers", default="2,4,8")
    c1.add_argument("--steps", type=int, default=150)
    c1.add_argument("--methods", default="adamw,lion,dlion_mavo,dlion_avg")
    c1.add_argument("--quiet", action="store_true", help="hide the demo's output (progress bars)")
    c1.add_argument("--rerun", action="store_true", help="ignore summaries already under --out")
    for name in ("claim2", "claim3", "claim4"):
        p = sub.add_parser(name)
        p.add_argument("--iters", type=int, default=150)
        p.add_argument("--layers", type=int, default=2)
        p.add_argument("--hidden", type=int, default=64)
        p.add_argument("--seq", type=int, default=64)
        p.add_argument("--micro-batch", type=int, default=4)
        p.add_argument("--global-batch", type=int, default=16)
        p.add_argument("--optimizer", default="adam", choices=["adam", "distlion"])
        p.add_argument("--lr", type=float, default=2e-3)
        p.add_argument("--eval-iters", type=int, default=8)
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--data", default="data_cache/stdlib")
        p.add_argument("--port", type=int, default=29631)
        p.add_argument("--rerun", action="store_true", help="ignore summaries already under --out")
        if name == "claim2":
            p.add_argument("--subset", choices=["reduced", "full"], default="full")
            p.add_argument("--only", default=None, help="comma-separated run names of the grid (e.g. none,act_topk10)")
        if name == "claim3":
            p.add_argument("--ratio", type=float, default=0.1)
        if name == "claim4":
            p.add_argument("--epoch-samples", type=int, default=160)
            p.add_argument("--with-plain", action="store_true", help="also TopK without AQ-SGD at each K")
    for p in sub.choices.values():
        p.add_argument("--out", default=None, help="runs folder (default runs/seeds/<claim>)")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    table = {"claim1": claim1, "claim2": claim2, "claim3": claim3, "claim4": claim4}[args.claim](args)
    out = pathlib.Path(args.out or f"runs/seeds/{args.claim}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
