"""One-command device check for a 1-GPU machine: correctness on CUDA, kernel bandwidth, TopK, D-Lion step, codecs.

Usage:
    make gpu-check                       # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py [--out-dir runs/gpu_check] [--numel 67108864] [--skip-tests] [--test-workers 8]
                                   [--dry-run]

Made for the machine issue 10 describes: Python 3.12, torch, triton 3.6, pytest, pydantic (the codecs' configs; carry
it as a wheel where it is missing), no deepspeed / megatron, no
internet, and the package NOT installed: the script puts the repo on ``sys.path`` and maps ``distlion_ds.kernels``
to the repo folder ``kernels/`` itself (pyproject's package-dir does that in an installation). Sections, each
recorded with its error instead of stopping the run:

1. tests/test_gpu_kernels.py with ``TRITON_INTERPRET=0``: every kernel on CUDA against its torch reference, exact.
2. Bandwidth of every kernel as a fraction of a device-to-device copy measured in the same run (target >= 0.85).
3. TopK-10 % of ``--numel`` elements: ``topk_select`` against ``torch.topk`` (target >= 5x), and exact against the
   CPU reference.
4. ``DistributedLion`` at world size 1 on CUDA, MaVo and Avg, fp32 and bf16: three steps bit-equal to the same
   steps on CPU (the torch references), and the step time.
5. Codec round trips on CUDA: payload bytes equal to the CPU path's, decode equal, for TopK and k-bit quantize.

Writes ``gpu_check.json`` and ``gpu_check.md`` (tables ready for benchmarks/RESULTS.md) to ``--out-dir``; exits 1
when a check fails, 2 without a CUDA device (unless ``--dry-run``, which exercises the setup and the report only).
Budget (measured on an H200, 2026-11-30): 3.2 minutes with ``--test-workers 15``, of which section 1 (kernel
compilation, CPU-bound) took 2.6; sections 2-5 take ~40 s.
"""

from __future__ import annotations

import os
import sys

# Before anything imports triton: the kernels must run compiled, not interpreted (tests/conftest.py only sets a
# default of 1 for the CPU suite, so an explicit 0 here wins). ``--device=cpu`` is the CPU suite's self-test of this
# script: the same sections, tiny, with the kernels interpreted (it proves the plumbing, not the GPU).
SELF_TEST = "--device=cpu" in sys.argv[1:]
os.environ["TRITON_INTERPRET"] = "1" if SELF_TEST else "0"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


def import_package_from_repo() -> tuple[str, str]:
    """Make ``distlion_ds`` and ``distlion_ds.kernels`` importable from the repo without installing it.

    Returns ``(how, file)``: "installed" or "repo path shim", and the file ``distlion_ds.kernels`` resolved to. An
    installed package (e.g. ``pip install -e .``) is used
    as is when it resolves; otherwise the repo root goes on ``sys.path`` and the repo root is appended to the
    package's ``__path__``, so the submodule ``kernels`` is found as the folder ``kernels/`` (what pyproject's
    ``package-dir`` maps in an installation).
    """
    for p in (str(REPO), str(BENCH)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import distlion_ds

    how = "installed"
    try:
        import distlion_ds.kernels as kernels
    except ModuleNotFoundError:
        distlion_ds.__path__.append(str(REPO))
        import distlion_ds.kernels as kernels

        how = "repo path shim"
    return how, str(Path(kernels.__file__).resolve())


# --------------------------------------------------------------------------------------------------- sections
def run_section(result: dict, name: str, fn, *args) -> None:
    """Run one section; its outcome (and error, if any) goes into ``result["sections"][name]``."""
    start = time.perf_counter()
    entry = {"ok": False}
    try:
        entry.update(fn(*args))
        entry["ok"] = bool(entry.get("ok", True))
    except Exception as e:  # recorded, and the other sections still run: one command, one full report
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc()[-4000:]
    entry["seconds"] = round(time.perf_counter() - start, 1)
    result["sections"][name] = entry
    print(f"[gpu-check] {name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)", flush=True)


class _Outcomes:
    """pytest plugin collecting each test's outcome."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            if report.nodeid not in self.outcomes or report.outcome != "passed":
                self.outcomes[report.nodeid] = report.outcome


def section_tests(workers: int = 0) -> dict:
    """tests/test_gpu_kernels.py on CUDA; ``workers`` > 0 spreads it over that many pytest-xdist processes when
    xdist is installed (the kernels' JIT compilation is most of the time, and it is CPU work)."""
    import importlib.util

    import pytest

    plugin = _Outcomes()
    args = ["-q", "-p", "no:cacheprovider", "--rootdir", str(REPO), "-c", str(REPO / "pyproject.toml")]
    xdist = workers > 0 and importlib.util.find_spec("xdist") is not None
    if xdist:
        args += ["-n", str(workers)]
    code = pytest.main(args + [str(REPO / "tests" / "test_gpu_kernels.py")], plugins=[plugin])
    counts: dict[str, int] = {}
    for outcome in plugin.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    failed = sorted(k for k, v in plugin.outcomes.items() if v == "failed")
    skipped = counts.get("skipped", 0)
    return {"ok": int(code) == 0 and not failed and not skipped and counts.get("passed", 0) > 0,
            "exit_code": int(code), "counts": counts, "failed": failed, "xdist_workers": workers if xdist else 0}


def section_bandwidth(device, numel: int, ranks: int) -> dict:
    import torch
    from _timing import timeit
    from bench_kernels import kernel_cases

    from distlion_ds import kernels as K

    (t_copy, copy_bw), cases, _, _ = kernel_cases(numel, ranks, device, extended=True)
    rows = [{"kernel": "copy (D2D, limit)", "ms": 1e3 * t_copy, "GB/s": copy_bw / 1e9, "frac_of_copy": 1.0}]
    for name, fn, nbytes in cases:
        t = timeit(fn, device)
        rows.append({"kernel": name, "ms": 1e3 * t, "GB/s": nbytes / t / 1e9, "frac_of_copy": nbytes / t / copy_bw})
    gen = torch.Generator(device=device).manual_seed(11)
    for n_ranks in (16, 64):  # the count's unrolled (<= 16 ranks) and looped paths
        recv = torch.randint(0, 256, (n_ranks, numel // 8), dtype=torch.uint8, device=device, generator=gen)
        for aggregation in ("mavo", "avg"):
            t = timeit(lambda recv=recv, n_ranks=n_ranks, a=aggregation: K.vote_count(recv, n_ranks, a, 1), device)
            nbytes = recv.numel() + K.lion.aggregate_bits(aggregation, n_ranks) * recv.shape[1]
            rows.append({"kernel": f"vote_count[{aggregation} N={n_ranks}]", "ms": 1e3 * t, "GB/s": nbytes / t / 1e9,
                         "frac_of_copy": nbytes / t / copy_bw})
        del recv
    below = [r["kernel"] for r in rows[1:] if r["frac_of_copy"] < 0.85]
    # A miss of the 85 % target is a finding to record, not a failed check: ok means "measured".
    return {"ok": True, "numel": numel, "ranks": ranks, "rows": rows, "below_85pct_of_copy": below}


def section_topk(device, numel: int) -> dict:
    import torch
    from _timing import timeit

    from distlion_ds import kernels as K

    gen = torch.Generator(device=device).manual_seed(5)
    x = torch.randn(numel, device=device, generator=gen)
    k = numel // 10
    t_ours = timeit(lambda: K.topk_select(x, k), device)
    t_torch = timeit(lambda: torch.topk(x.abs(), k, sorted=False), device)
    values, indices = K.topk_select(x, k)
    values_ref, indices_ref = K.topk_select_ref(x.cpu(), k)
    exact = bool(torch.equal(indices.cpu(), indices_ref) and torch.equal(values.cpu(), values_ref))
    return {"ok": exact, "numel": numel, "k": k, "ms": 1e3 * t_ours, "torch_topk_ms": 1e3 * t_torch,
            "speedup_vs_torch_topk": t_torch / t_ours, "exact_vs_reference": exact,
            # where the time goes, per kernel (radix passes, pick, count, scan, write): the select misses its target
            "profile": _profile(lambda: K.topk_select(x, k), device)}


def _lion_run(device, aggregation: str, dtype, numel: int, steps: int = 3):
    """A small model's parameters after ``steps`` DistributedLion steps with fixed gradients (world size 1)."""
    import torch

    import distlion_ds

    gen = torch.Generator().manual_seed(0)
    shapes = [(max(1, numel // 65536), 1000), (1000,), (3, 5, 7), (1,), (4096,)]  # (1024, 1000) at 64M
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype).to(device)) for s in shapes]
    grads = [[(torch.randn(s, generator=gen)).to(dtype) for s in shapes] for _ in range(steps)]
    opt = distlion_ds.DistributedLion(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, aggregation=aggregation)
    for t in range(steps):
        for p, g in zip(params, grads[t], strict=True):
            p.grad = None if p.numel() == 4096 else g.to(device)  # the last one never gets a gradient
        opt.step()
    return [p.detach().cpu() for p in params], opt


def section_dlion(device, numel: int) -> dict:
    import torch
    from bench_kernels import copy_bandwidth

    import distlion_ds

    _, copy_bw = copy_bandwidth(numel, device)  # bytes read + written per second
    rows, profiles = [], {}
    ok = True
    for aggregation in ("mavo", "avg"):
        for dtype in (torch.float32, torch.bfloat16):
            on_gpu, _ = _lion_run(device, aggregation, dtype, numel)
            on_cpu, _ = _lion_run("cpu", aggregation, dtype, numel)
            equal = all(torch.equal(a.view(torch.int16 if a.dtype != torch.float32 else torch.int32),
                                    b.view(torch.int16 if b.dtype != torch.float32 else torch.int32))
                        for a, b in zip(on_gpu, on_cpu, strict=True))
            ok &= equal
            # Step time on a 16 x numel/16-element model (grads fixed): what one D-Lion step costs on this GPU.
            params = [torch.nn.Parameter(torch.randn(numel // 16, device=device).to(dtype)) for _ in range(16)]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = distlion_ds.DistributedLion(params, lr=1e-4, aggregation=aggregation)
            step_s, pipelined_s = _time_step(opt, device)
            size = torch.finfo(dtype).bits // 8
            nbytes = numel * (2 * size + 2 * size + 12)  # votes: g, m; apply: p, m, g in, p, m out (fp32 m)
            rows.append({"aggregation": aggregation, "dtype": str(dtype).removeprefix("torch."),
                         "bit_equal_to_cpu_after_3_steps": equal, "step_ms": 1e3 * step_s,
                         "pipelined_step_ms": 1e3 * pipelined_s, "floor_ms": 1e3 * nbytes / copy_bw,
                         "params": numel})
            profiles[f"{aggregation} {rows[-1]['dtype']}"] = _profile(opt.step, device)
            del params, opt
    return {"ok": ok, "rows": rows, "profiles": profiles, "layouts": _step_layouts(device, numel)}


def _time_step(opt, device, reps: int = 20, warmup: int = 3, min_time: float = 0.3) -> tuple[float, float]:
    """(median seconds per step, synchronised after each; seconds per step over ``reps`` back to back, where the
    host launches ahead: max(host, device)). Warm-up of 3 steps: Triton specialises integer arguments equal to 1,
    so step 1 and step 2 compile different variants."""
    from _timing import sync, timeit

    step_s = timeit(opt.step, device, min_time=min_time, warmup=warmup)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        opt.step()
    sync(device)
    return step_s, (time.perf_counter() - start) / reps


def _step_layouts(device, numel: int) -> list[dict]:
    """A bf16 MaVo step over a GPT-like list of 147 tensors: separately allocated, with the multi-tensor launches
    (one launch per kind of tensor) and with one launch per tensor and kernel (``kernels.lion.MULTI_TENSOR`` off),
    against the same tensors as views of one flat buffer, gradients too (one launch per bucket run): how much of a
    step is host-side launching, and what the multi-tensor launches win back."""
    import torch
    from _timing import gpt_like_shapes

    import distlion_ds
    from distlion_ds.kernels import lion as lion_kernels

    shapes = gpt_like_shapes(numel)
    total = sum(torch.Size(s).numel() for s in shapes)
    rows = []
    for layout in ("separate, multi-tensor", "separate, per tensor", "flat"):
        if layout.startswith("separate"):
            params = [torch.nn.Parameter(torch.randn(s, device=device).to(torch.bfloat16)) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
        else:
            flat_p = torch.randn(total, device=device).to(torch.bfloat16)
            flat_g = torch.randn(total, device=device).to(torch.bfloat16)
            params, off = [], 0
            for s in shapes:
                n = torch.Size(s).numel()
                p = torch.nn.Parameter(flat_p[off: off + n].view(s))
                p.grad = flat_g[off: off + n].view(s)
                params.append(p)
                off += n
        opt = distlion_ds.DistributedLion(params, lr=1e-4, aggregation="mavo")
        reps = 1 if SELF_TEST else 20  # the interpreted self-test proves the plumbing (~1 s a step there)
        lion_kernels.MULTI_TENSOR = layout != "separate, per tensor"
        try:
            step_s, pipelined_s = _time_step(opt, device, reps, warmup=0 if SELF_TEST else 3,
                                             min_time=0.0 if SELF_TEST else 0.3)
        finally:
            lion_kernels.MULTI_TENSOR = True
        rows.append({"layout": layout, "tensors": len(shapes), "params": total, "step_ms": 1e3 * step_s,
                     "pipelined_step_ms": 1e3 * pipelined_s})
        del params, opt
    return rows


def _profile(fn, device, steps: int = 2) -> str:
    """torch.profiler's table of ``fn`` run ``steps`` times: where a step's time goes, host and device."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    return (averages.table(sort_by=sort, row_limit=12) + "\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=12))


def section_codecs(device) -> dict:
    import torch

    from distlion_ds.compress import codecs

    configs = [{"method": "topk", "ratio": 0.1}, {"method": "topk", "ratio": 0.01},
               {"method": "quantize", "bits": 8, "block_size": 256},
               {"method": "quantize", "bits": 4, "block_size": 256, "stochastic": True},
               {"method": "quantize", "bits": 2, "block_size": 128}]
    rows, ok = [], True
    gen = torch.Generator().manual_seed(3)
    for config in configs:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = (torch.randn(4 if SELF_TEST else 64, 4099, generator=gen) * 2).to(dtype)
            gpu, cpu = codecs.build_codec(config), codecs.build_codec(config, provider="torch")
            payload = gpu.encode(t.to(device), seed=11)
            payload_ref = cpu.encode(t, seed=11)
            same_payload = bool(torch.equal(payload.cpu(), payload_ref))
            out = gpu.decode(payload, t.shape, dtype).cpu()
            out_ref = cpu.decode(payload_ref, t.shape, dtype)
            same_decode = bool(torch.equal(torch.isnan(out), torch.isnan(out_ref))
                               and torch.equal(out[~torch.isnan(out)], out_ref[~torch.isnan(out_ref)]))
            ok &= same_payload and same_decode
            rows.append({"codec": ",".join(f"{k}={v}" for k, v in config.items()),
                         "dtype": str(dtype).removeprefix("torch."), "payload_bytes": payload.numel(),
                         "payload_equal_to_cpu": same_payload, "decode_equal_to_cpu": same_decode})
    return {"ok": ok, "rows": rows}


# --------------------------------------------------------------------------------------------------- report
def render_markdown(result: dict) -> str:
    """The report as markdown: a header line and one table per section (ready for benchmarks/RESULTS.md)."""
    env = result["environment"]
    lines = [f"### Device check ({env['date']}, {env['device']})", "",
             f"torch {env['torch']}, triton {env['triton']}, Python {env['python']}, "
             f"`distlion_ds.kernels` from `{env['kernels_from']}` ({env['package']}), run on {env['run_on']}. "
             "Command: `make gpu-check`.", ""]
    sections = result["sections"]
    if not sections:
        lines.append("No section ran" + (" (dry run)." if result.get("dry_run") else "."))
    for name, s in sections.items():
        status = "ok" if s.get("ok") else "FAILED"
        lines.append(f"**{name}**: {status} ({s.get('seconds', 0)} s)" + (f" — `{s['error']}`" if "error" in s else ""))
        lines.append("")
        if name == "tests" and "counts" in s:
            lines.append(f"tests/test_gpu_kernels.py: {s['counts']}" + (f"; failed: {s['failed']}" if s["failed"]
                                                                        else "")
                         + (f" ({s['xdist_workers']} xdist workers)" if s.get("xdist_workers") else ""))
            lines.append("")
        if name == "bandwidth" and "rows" in s:
            lines += [f"{s['numel']} elements, vote_count/lion_apply with N = {s['ranks']}.", "",
                      "| kernel | ms | GB/s | of D2D copy |", "|---|---:|---:|---:|"]
            lines += [f"| {r['kernel']} | {r['ms']:.3f} | {r['GB/s']:.1f} | {r['frac_of_copy']:.2f} |"
                      for r in s["rows"]]
            lines.append("")
        if name == "topk" and "ms" in s:
            lines += ["| numel | k | topk_select ms | torch.topk ms | speed-up | exact |",
                      "|---:|---:|---:|---:|---:|---|",
                      f"| {s['numel']} | {s['k']} | {s['ms']:.3f} | {s['torch_topk_ms']:.3f} | "
                      f"{s['speedup_vs_torch_topk']:.2f}x | {s['exact_vs_reference']} |", ""]
        if name == "dlion" and "rows" in s:
            lines += ["Step ms: median, synchronised after each step; back to back: 20 steps without a sync (the host "
                      "launches ahead); floor: the step's bytes (votes: g, m; apply: p, m, g in, p, m out) over a "
                      "device-to-device copy's rate measured in the same section.", "",
                      "| aggregation | dtype | bit-equal to CPU (3 steps) | params | step ms | back to back ms "
                      "| floor ms | floor / back to back |", "|---|---|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['aggregation']} | {r['dtype']} | {r['bit_equal_to_cpu_after_3_steps']} | "
                      f"{r['params']} | {r['step_ms']:.3f} | {r['pipelined_step_ms']:.3f} | {r['floor_ms']:.3f} | "
                      f"{r['floor_ms'] / r['pipelined_step_ms']:.2f} |" for r in s["rows"]]
            if s.get("layouts"):
                lines += ["", "A bf16 MaVo step over a GPT-like list of tensors, separately allocated (multi-tensor "
                          "launches, or one launch per tensor) vs views of one flat buffer (gradients too):", "",
                          "| layout | tensors | params | step ms | back to back ms |", "|---|---:|---:|---:|---:|"]
                lines += [f"| {r['layout']} | {r['tensors']} | {r['params']} | {r['step_ms']:.3f} | "
                          f"{r['pipelined_step_ms']:.3f} |" for r in s["layouts"]]
            lines.append("")
        if name == "codecs" and "rows" in s:
            lines += ["| codec | dtype | payload bytes | payload == CPU | decode == CPU |", "|---|---|---:|---|---|"]
            lines += [f"| {r['codec']} | {r['dtype']} | {r['payload_bytes']} | {r['payload_equal_to_cpu']} | "
                      f"{r['decode_equal_to_cpu']} |" for r in s["rows"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    profiles = result["sections"].get("dlion", {}).get("profiles")
    if profiles:
        (out_dir / "dlion_profile.txt").write_text("".join(f"## {k}\n{v}\n" for k, v in profiles.items()))
    topk_profile = result["sections"].get("topk", {}).get("profile")
    if topk_profile:
        (out_dir / "topk_profile.txt").write_text(topk_profile)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md_path.write_text(render_markdown(result))
    return json_path, md_path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(REPO / "runs" / "gpu_check"), help="where the JSON and markdown go")
    ap.add_argument("--numel", type=int, default=64 << 20, help="elements per tensor for bandwidth and TopK")
    ap.add_argument("--ranks", type=int, default=4, help="N for vote_count / lion_apply in the bandwidth table")
    ap.add_argument("--skip-tests", action="store_true", help="skip section 1 (the exact tests on CUDA)")
    ap.add_argument("--test-workers", type=int, default=0,
                    help="pytest-xdist processes for section 1 when xdist is installed (0: in this process)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU sections: check the setup and write the report")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: self-test of this script with the kernels interpreted (pass as --device=cpu)")
    args = ap.parse_args(argv)
    if args.numel < 1024 or args.numel % 1024:
        ap.error(f"--numel must be a positive multiple of 1024, got {args.numel}")
    if not 1 <= args.ranks <= 64:
        ap.error(f"--ranks must be in [1, 64], got {args.ranks}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if (args.device == "cpu") != SELF_TEST:
        raise SystemExit("pass the CPU self-test as --device=cpu (it must be seen before triton is imported)")
    how, kernels_from = import_package_from_repo()
    import torch
    import triton

    device = torch.device(args.device)
    cuda = torch.cuda.is_available() and device.type == "cuda"
    result = {
        "environment": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name() if cuda else "no CUDA device",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "kernels_from": os.path.relpath(kernels_from, REPO), "package": how, "numel": args.numel,
            "run_on": str(device) + (" (self-test, kernels interpreted)" if SELF_TEST else ""),
        },
        "dry_run": args.dry_run, "sections": {},
    }
    if not cuda and not args.dry_run and not SELF_TEST:
        print("[gpu-check] no CUDA device: nothing to check (use --dry-run to test the setup)", file=sys.stderr)
        write_report(result, Path(args.out_dir))
        return 2
    if not args.dry_run:
        sections = [("bandwidth", section_bandwidth, device, args.numel, args.ranks),
                    ("topk", section_topk, device, args.numel), ("dlion", section_dlion, device, args.numel),
                    ("codecs", section_codecs, device)]
        if not args.skip_tests and not SELF_TEST:
            sections.insert(0, ("tests", section_tests, args.test_workers))
        for name, fn, *fn_args in sections:
            run_section(result, name, fn, *fn_args)
            write_report(result, Path(args.out_dir))  # after each section: a run cut short still leaves its report
    json_path, md_path = write_report(result, Path(args.out_dir))
    print(f"[gpu-check] wrote {json_path} and {md_path}")
    print(md_path.read_text())
    return 0 if all(s["ok"] for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
