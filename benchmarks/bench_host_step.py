"""Host time of a ``DistributedLion`` step on a GPU target, per-tensor vs multi-tensor launches, without a GPU.

    python benchmarks/bench_host_step.py [--numel 67108864] [--steps 30] [--arch 90] [--dtype bf16] [--out x.json]

A GPT-like list of 147 separately allocated tensors (``_timing.gpt_like_shapes``) as ``meta`` tensors, world size 1,
under ``kernels._dispatch.compile_only()`` with the fake CUDA driver of tests/_fake_cuda.py: every launch goes through
Triton's own launch path (argument binding, specialisation key, kernel-cache lookup) for sm_80 / sm_90 and stops
before the driver call. So the figure is the host time a step costs on a GPU machine *minus* the driver's
``cuLaunchKernelEx`` (a few us per launch on an H200), i.e. a lower bound for the per-tensor path's real cost.
Printed: launches per step and host ms per step for both paths, measured interleaved in the same run, and the ratio.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, do not interpret

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 26, help="parameters (meta tensors: no memory is used)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per path")
    ap.add_argument("--arch", type=int, choices=[80, 90], default=90)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)

    import _fake_cuda
    from _timing import gpt_like_shapes

    import distlion_ds
    from distlion_ds.kernels import _dispatch
    from distlion_ds.kernels import lion as lion_kernels

    _fake_cuda.install(args.arch)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shapes = gpt_like_shapes(args.numel)
    params = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device="meta")) for s in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = distlion_ds.DistributedLion(params, lr=1e-4, aggregation="mavo")
    paths = {"per tensor": False, "multi-tensor": True}
    times: dict[str, list[float]] = {name: [] for name in paths}
    launches: dict[str, int] = {}
    with _dispatch.compile_only() as compiled:
        for multi in paths.values():  # compile every variant (step 1 and steps > 1 specialise differently)
            lion_kernels.MULTI_TENSOR = multi
            for _ in range(3):
                opt.step()
        for _ in range(args.steps):  # interleaved, so load on the machine hits both paths alike
            for name, multi in paths.items():
                lion_kernels.MULTI_TENSOR = multi
                before = len(compiled)
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)
                launches[name] = len(compiled) - before
    lion_kernels.MULTI_TENSOR = True
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    result = {"tensors": len(shapes), "params": sum(p.numel() for p in params), "dtype": args.dtype,
              "arch": args.arch, "launches_per_step": launches, "host_ms_per_step": ms,
              "per_tensor_over_multi": ms["per tensor"] / ms["multi-tensor"]}
    print(f"DistributedLion step, {result['tensors']} tensors ({result['params']} params, {args.dtype}), sm_{args.arch}"
          f" launch path without the driver call, median of {args.steps} steps each:")
    for name in paths:
        print(f"  {name:13s} {launches[name]:4d} launches/step  {ms[name]:7.3f} ms host/step")
    print(f"  per tensor / multi-tensor: {result['per_tensor_over_multi']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
