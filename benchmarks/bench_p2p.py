"""Pipeline p2p codecs: bytes/element and encode+decode throughput, against the uncompressed send of the same run.

Usage:
    python benchmarks/bench_p2p.py [--provider triton|torch] [--shape 4096 1 4096] [--dtype bfloat16]
                                   [--link-gbps 1 10 100] [--no-send] [--csv out.csv]
                                   [--frame-shape 16 1 64] [--frame-only]

Per method (the frames CompressedP2PCommunicator sends, header included):
- ``B/elem``: wire bytes per tensor element; ``ratio``: uncompressed bytes / frame bytes.
- ``enc ms`` / ``dec ms``: median encode / decode time; ``GB/s``: tensor bytes / (encode + decode).
- ``send ms``: measured over a real gloo pair on loopback (two processes, frame send + decode on the receiver),
  next to ``none`` (the uncompressed send) measured the same way in the same run; loopback is far faster than
  any network link, so this is the codecs' overhead floor rather than their benefit.
- ``x@N Gb/s``: modeled speedup of one transfer over a link of N Gbit/s:
  ``raw_bytes / bw`` against ``encode + frame_bytes / bw + decode`` (no overlap assumed).
On a GPU (provider triton) the Triton kernels run; on a CPU the torch references (the CPU implementation).

A second table gives the per-frame cost on a small tensor (``--frame-shape``), where fixed costs dominate:
``frame us`` = one frame encoded and decoded by PipeCompressor (receiver naming the cut, as the 1F1B communicator
does), ``codec us`` = the codec's own encode + decode of the same tensor in the same run, ``overhead us`` = the
difference (header, feedback bookkeeping, checks, byte counts).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.multiprocessing as mp
from _timing import resolve_provider, timeit

from distlion_ds.compress import CompressionConfig, CompressionState, Mode, PipeCompressor

METHODS = {
    "none": {"method": "none"},
    "topk 10%": {"method": "topk", "ratio": 0.1},
    "topk 1%": {"method": "topk", "ratio": 0.01},
    "quantize 8b": {"method": "quantize", "bits": 8, "block_size": 256},
    "quantize 4b": {"method": "quantize", "bits": 4, "block_size": 256},
    "quantize 2b": {"method": "quantize", "bits": 2, "block_size": 256},
}


def _compressor(cfg: dict, provider: str) -> PipeCompressor:
    c = CompressionConfig(activations=cfg)
    return PipeCompressor(CompressionState(c), provider="torch" if provider == "torch" else "auto")


def _send_worker(rank: int, port: int, shape, dtype, provider: str, iters: int, out: dict) -> None:
    # Two processes share the cores of a CPU run: half each, or they oversubscribe (DESIGN 4: ~50x slower).
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for name, cfg in METHODS.items():
        pc = _compressor(cfg, provider)
        n = pc.frame_nbytes("activations", shape, dtype, Mode.TRAIN)
        times = []
        for i in range(iters + 2):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                torch.distributed.send(pc.encode("activations", x, stage=0, chunk=0, mode=Mode.TRAIN), 1)
            else:
                frame = torch.empty(n, dtype=torch.uint8)
                torch.distributed.recv(frame, 0)
                pc.decode("activations", frame, shape, dtype, Mode.TRAIN)
            torch.distributed.barrier()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        if rank == 1:
            out[name] = float(np.median(times))
    torch.distributed.destroy_process_group()


def measure_sends(shape, dtype, provider: str, iters: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_send_worker, args=(port, tuple(shape), dtype, provider, iters, out), nprocs=2)
        return dict(out)


def frame_overhead(shape, dtype, device, provider: str) -> list[dict]:
    """Per-frame cost against the bare codec on a small tensor (see the module docstring)."""
    x = torch.randn(shape, device=device).to(dtype)
    rows = []
    for name, cfg in METHODS.items():
        pc = _compressor(cfg, provider)
        codec = pc.codecs["activations"]
        # the receiver names the cut where the decode accepts it (the communicator's 1F1B path)
        kw = {"cut": (0, 0)} if "cut" in inspect.signature(pc.decode).parameters else {}

        def frame(pc=pc, kw=kw):
            f = pc.encode("activations", x, stage=0, chunk=0, mode=Mode.TRAIN)
            return pc.decode("activations", f, shape, dtype, Mode.TRAIN, **kw)

        t_frame = timeit(frame, device, min_time=1.0)
        t_codec = timeit(lambda c=codec: c.decode(c.encode(x), shape, dtype), device, min_time=1.0)
        rows.append({"method": name, "frame us": 1e6 * t_frame, "codec us": 1e6 * t_codec,
                     "overhead us": 1e6 * (t_frame - t_codec)})
    return rows


def _table(rows: list[dict]) -> None:
    cols = list(rows[0])
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>12.4g}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in cols))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", choices=["triton", "torch"], default=None,
                    help="triton: the Triton kernels (needs CUDA); torch: the torch references")
    ap.add_argument("--shape", type=int, nargs="+", default=None,
                    help="activation [seq, batch, hidden] (default 4096 1 4096 on GPU, 2048 1 1024 on CPU)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--link-gbps", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    ap.add_argument("--no-send", action="store_true", help="skip the two-process loopback send")
    ap.add_argument("--iters", type=int, default=10, help="loopback sends per method")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--frame-shape", type=int, nargs="+", default=[16, 1, 64],
                    help="small tensor of the per-frame cost table")
    ap.add_argument("--frame-only", action="store_true", help="only the per-frame cost table")
    args = ap.parse_args(argv)
    provider, device = resolve_provider(ap, args.provider)
    dtype = getattr(torch, args.dtype)
    fshape = tuple(args.frame_shape)
    frames = frame_overhead(fshape, dtype, device, provider)
    print(f"# per-frame cost  provider={provider}  shape={list(fshape)} {args.dtype}")
    _table(frames)
    if args.frame_only:
        return 0
    shape = tuple(args.shape or ((4096, 1, 4096) if device.type == "cuda" else (2048, 1, 1024)))
    x = torch.randn(shape, device=device).to(dtype)
    raw = x.numel() * x.element_size()

    sends = {} if args.no_send or device.type == "cuda" else measure_sends(shape, dtype, provider, args.iters)
    rows = []
    for name, cfg in METHODS.items():
        pc = _compressor(cfg, provider)
        frame = pc.encode("activations", x, stage=0, chunk=0, mode=Mode.TRAIN)
        t_enc = timeit(lambda pc=pc: pc.encode("activations", x, stage=0, chunk=0, mode=Mode.TRAIN), device)
        t_dec = timeit(lambda pc=pc, f=frame: pc.decode("activations", f, shape, dtype, Mode.TRAIN), device)
        row = {"method": name, "B/elem": frame.numel() / x.numel(), "ratio": raw / frame.numel(),
               "enc ms": 1e3 * t_enc, "dec ms": 1e3 * t_dec, "GB/s": raw / (t_enc + t_dec) / 1e9}
        if sends:
            row["send ms"] = 1e3 * sends[name]
            row["send vs none"] = sends["none"] / sends[name]
        for gbps in args.link_gbps:
            bw = gbps * 1e9 / 8
            row[f"x@{gbps:g}Gb/s"] = (raw / bw) / (t_enc + frame.numel() / bw + t_dec)
        rows.append(row)

    print(f"# bench_p2p  device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}  "
          f"provider={provider}  shape={list(shape)} {args.dtype}  ({x.numel()} elements, {raw / 2**20:.1f} MiB)")
    _table(rows)
    cols = list(rows[0])
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
