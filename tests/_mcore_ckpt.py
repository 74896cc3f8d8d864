"""Read a checkpoint of ``distlion_ds.megatron.pretrain_gpt`` in one process (no process group) for comparisons:
every tensor and object of the dist_checkpointing files, the common state and every rank's side file."""

from __future__ import annotations

import pathlib

import numpy as np
import torch


def contents(folder: pathlib.Path, tmp: pathlib.Path) -> dict:
    """``{"dcp/<key>": ..., "common": ..., "rank_state/<file>": ...}`` of one ``iter_XXXXXXX`` folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from distlion_ds import checkpoint_io as cio

    tmp.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(str(folder), str(tmp))
    out = {f"dcp/{k}": v for k, v in torch.load(tmp, weights_only=False).items()}
    out["common"] = torch.load(folder / "common.pt", weights_only=False)
    for f in sorted((folder / "rank_state").glob("*.pt")):
        out[f"rank_state/{f.name}"] = cio.load_verified(f, weights_only=False)
    return out


def flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from flatten(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for n, v in enumerate(obj):
            yield from flatten(v, f"{prefix}/{n}")
    else:
        yield prefix, obj


def assert_same(a, b, what: str, skip: tuple[str, ...] = ()) -> None:
    """Exactly equal (tensors bit for bit, NumPy arrays, everything else with ==), except keys containing ``skip``."""
    fa = {k: v for k, v in flatten(a) if not any(s in k for s in skip)}
    fb = {k: v for k, v in flatten(b) if not any(s in k for s in skip)}
    assert fa.keys() == fb.keys(), (what, sorted(fa.keys() ^ fb.keys())[:10])
    for k, va in fa.items():
        vb = fb[k]
        if torch.is_tensor(va):
            assert torch.equal(va, vb), f"{what}: {k} differs"
        elif isinstance(va, np.ndarray):
            assert np.array_equal(va, vb), f"{what}: {k} differs"
        else:
            assert va == vb, f"{what}: {k}: {va!r} != {vb!r}"
