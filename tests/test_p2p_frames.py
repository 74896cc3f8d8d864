"""Pipeline frames without host syncs, on meta tensors, with bounded feedback state (issues 9 and 10), one process.

Meta tensors hold no data: any ``.item()``, ``.tolist()`` or ``.nonzero()`` on them raises, so a codec or frame
path that runs on meta reads nothing on the host. That is the check for the GPU path's "no host sync per frame"
on a machine without a GPU (CPU frames are read on the host on purpose: precise error messages, no cost there).
"""

from __future__ import annotations

import pytest
import torch

from distlion_ds.compress import (
    HEADER_BYTES,
    CompressionConfig,
    CompressionState,
    FeedbackStore,
    Mode,
    PipeCompressor,
    StreamKey,
    build_codec,
)
from distlion_ds.compress.codecs import bitmap_gather
from distlion_ds.compress.pipe import find_disagreements
from distlion_ds.kernels.signs import unpack_bits_ref

META = torch.device("meta")
CODECS = [{"method": "none"}, {"method": "topk", "ratio": 0.1}, {"method": "topk", "ratio": 0.01},
          {"method": "quantize", "bits": 8, "block_size": 256}, {"method": "quantize", "bits": 2, "block_size": 64}]


def _pair(cfg: dict) -> tuple[PipeCompressor, PipeCompressor]:
    c = CompressionConfig.from_json(cfg)
    return PipeCompressor(CompressionState(c)), PipeCompressor(CompressionState(c))


@pytest.mark.parametrize("cfg", CODECS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_codecs_on_meta_tensors(cfg):
    codec = build_codec(cfg)
    for shape in [(4096, 2, 64), (1000,), (3, 5, 67)]:
        x = torch.empty(shape, dtype=torch.bfloat16, device=META)
        p = codec.encode(x)
        assert p.device == META and p.dtype == torch.uint8 and p.numel() == codec.nbytes(shape, torch.bfloat16)
        y = codec.decode(p, shape, torch.bfloat16)
        assert y.device == META and tuple(y.shape) == shape and y.dtype == torch.bfloat16


@pytest.mark.parametrize("feedback", ["none", "ef", "ef21"])
def test_frames_on_meta_tensors(feedback):
    """Encode and decode (cut known, as a 1F1B receiver) with every stateless and EF mode: nothing read on host."""
    snd, rcv = _pair({"activations": {"method": "topk", "ratio": 0.1, "feedback": feedback},
                      "gradients": {"method": "quantize", "bits": 4, "feedback": feedback},
                      "inference": "uncompressed"})
    shape = (32, 2, 64)
    for direction, mode in [("activations", Mode.TRAIN), ("gradients", Mode.TRAIN), ("activations", Mode.RAW)]:
        for _ in range(2):  # the second transfer reads the feedback state the first one stored
            x = torch.empty(shape, device=META)
            f = snd.encode(direction, x, stage=1, chunk=0, mode=mode)
            assert f.device == META and f.numel() == snd.frame_nbytes(direction, shape, x.dtype, mode)
            y, info = rcv.decode(direction, f, shape, x.dtype, mode, cut=(1, 0))
            assert y.device == META and tuple(y.shape) == shape
            assert info is not None and (info.stage, info.chunk, info.mode) == (1, 0, mode)
    # without a cut, a stateless receiver needs nothing from the header either
    if feedback == "none":
        f = snd.encode("activations", torch.empty(shape, device=META), stage=1, chunk=0, mode=Mode.TRAIN)
        y, info = rcv.decode("activations", f, shape, torch.float32, Mode.TRAIN)
        assert info is None and tuple(y.shape) == shape


def test_topk_bitmap_decode_matches_scatter_oracle():
    """Both bitmap decodes (CPU scatter, device gather) against an independent oracle: keep the k largest |x|
    (ties to the lower index), zeros elsewhere, bit for bit (signed zeros and NaN included)."""
    codec = build_codec({"method": "topk", "ratio": 0.3})
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3000, generator=g).to(dtype)
        x[::7] = 0.0
        x[5] = -0.0
        x[11] = float("nan")
        k = codec.k(x.numel())
        assert codec._index_layout(x.numel())[0] == "bitmap"
        p = codec.encode(x)
        y = codec.decode(p, x.shape, dtype)  # CPU: nonzero + scatter
        vbytes = k * dtype.itemsize
        bits = unpack_bits_ref(p[vbytes:], x.numel()).view(torch.bool)
        z = bitmap_gather(bits, p[:vbytes].view(dtype), k)  # the device path, here on CPU data
        key = torch.where(torch.isnan(x.float()), torch.inf, x.float().abs())
        order = sorted(range(x.numel()), key=lambda i: (-key[i].item(), i))[:k]
        want = torch.zeros_like(x)
        want[order] = x[order]
        as_int = torch.int16 if dtype != torch.float32 else torch.int32
        assert torch.equal(y.view(as_int), want.view(as_int)) and torch.equal(z.view(as_int), want.view(as_int))
        bad = bits.clone()
        bad[0] = ~bad[0]
        with pytest.raises(ValueError, match=f"exactly k={k} bits"):
            bitmap_gather(bad, p[:vbytes].view(dtype), k)


def test_corrupt_topk_bitmap_refused():
    codec = build_codec({"method": "topk", "ratio": 0.25})
    x = torch.randn(800)
    p = codec.encode(x)
    vbytes = codec.k(800) * 4
    p[vbytes] = 0 if p[vbytes].item() else 0xFF  # the first 8 index bits changed: no longer k bits set
    with pytest.raises(ValueError, match="exactly k=200 bits set"):
        codec.decode(p, x.shape, x.dtype)


def test_header_checked_against_the_expected_cut():
    snd, rcv = _pair({"gradients": {"method": "quantize", "bits": 8, "feedback": "ef21"}})
    x = torch.randn(8, 2, 16)
    f = snd.encode("gradients", x, stage=2, chunk=1, mode=Mode.TRAIN)
    with pytest.raises(ValueError, match=r"crossed cut \(stage 2, chunk 1\), expected \(stage 2, chunk 0\)"):
        rcv.decode("gradients", f, x.shape, x.dtype, Mode.TRAIN, cut=(2, 0))
    y, info = rcv.decode("gradients", f, x.shape, x.dtype, Mode.TRAIN, cut=(2, 1))
    assert (info.stage, info.chunk) == (2, 1)
    f = snd.encode("gradients", x, stage=2, chunk=1, mode=Mode.TRAIN)
    y2, info2 = rcv.decode("gradients", f, x.shape, x.dtype, Mode.TRAIN)  # cut read from the header
    assert (info2.stage, info2.chunk) == (2, 1)
    with pytest.raises(ValueError, match="not a distlion_ds p2p frame"):
        rcv.decode("gradients", torch.zeros_like(f), x.shape, x.dtype, Mode.TRAIN, cut=(2, 1))


def test_header_cache_bounded_and_frames_equal_fresh_headers():
    snd, rcv = _pair({"activations": {"method": "quantize", "bits": 8}})
    x = torch.randn(4, 2, 8)
    for epoch in range(300):  # every epoch a new header: the cache stays bounded
        snd.state.set_epoch(epoch)
        rcv.state.set_epoch(epoch)
        f = snd.encode("activations", x, stage=0, chunk=0, mode=Mode.TRAIN)
        head = f[:HEADER_BYTES].view(torch.int32).tolist()
        assert head == [0x444C5032, int(Mode.TRAIN), 0, 0, epoch, 0]
        rcv.decode("activations", f, x.shape, x.dtype, Mode.TRAIN, cut=(0, 0))
    assert len(snd._headers) <= 256


def test_feedback_bounded_under_variable_lengths():
    """EF21 with a new sequence length every few transfers: memory bounded, both sides equal, a state never
    meets a tensor of another shape."""
    cfg = {"activations": {"method": "quantize", "bits": 2, "block_size": 64, "feedback": "ef21"}}
    snd, rcv = _pair(cfg)
    ref = build_codec({"method": "quantize", "bits": 2, "block_size": 64})
    g = torch.Generator().manual_seed(9)
    oracle: dict[int, torch.Tensor] = {}  # independent model: LRU of 4 lengths, zeros for a new or evicted one
    lru: list[int] = []
    for step in range(40):
        seq = [8, 16, 24, 32, 40, 48][(step * 5) % 6] if step % 3 else 8 + step
        x = torch.randn(seq, 2, 16, generator=g)
        f = snd.encode("activations", x, stage=0, chunk=0, mode=Mode.TRAIN)
        y, _ = rcv.decode("activations", f, x.shape, x.dtype, Mode.TRAIN, cut=(0, 0))
        gprev = oracle.get(seq, torch.zeros(x.shape))
        gnew = gprev + ref.decode(ref.encode(x - gprev), x.shape, x.dtype)
        oracle[seq] = gnew
        if seq in lru:
            lru.remove(seq)
        lru.append(seq)
        while len(lru) > 4:
            oracle.pop(lru.pop(0))
        assert torch.equal(y, gnew), step
        assert len(snd.state.feedback) <= 4 and len(rcv.state.feedback) <= 4
    assert snd.state.feedback.evictions == rcv.state.feedback.evictions > 0
    # resume keeps the eviction order: a restored store evicts exactly like the original
    fs = FeedbackStore()
    fs.load_state_dict(snd.state.feedback.state_dict())
    assert [tuple(s) for _, s, _ in fs.state_dict()["tensors"]] == [tuple(s) for _, s, _ in
                                                                    snd.state.feedback.state_dict()["tensors"]]
    key = StreamKey(0, 0, "activations", "send")
    assert not fs.get(key, (999, 2, 16), torch.device("cpu")).any()  # an unknown shape starts from zeros
    with pytest.raises(ValueError, match="max_shapes"):
        FeedbackStore(max_shapes=0)


def test_settings_and_disagreements():
    a = PipeCompressor(CompressionState(CompressionConfig.from_json(
        {"activations": {"method": "topk", "ratio": 0.1, "feedback": "aqsgd"},
         "aqsgd": {"store": "disk", "path": "/a"}})))
    b = PipeCompressor(CompressionState(CompressionConfig.from_json(
        {"activations": {"method": "topk", "ratio": 0.2, "feedback": "aqsgd"},
         "aqsgd": {"store": "cpu"}})))
    sa, sb = a.settings(), b.settings()
    assert "compression.aqsgd.path" not in sa and "compression.aqsgd.store" not in sa  # local placement
    assert sa["compression.activations.ratio"] == 0.1 and sa["protocol"] == sb["protocol"]
    assert find_disagreements([sa, sa, sa]) == []
    assert find_disagreements([sa, sb, sa], ranks=[4, 5, 6]) == [
        "compression.activations.ratio: ranks [4, 6] have 0.1; ranks [5] have 0.2"]
    assert find_disagreements([{"x": 1}, {}]) == ["x: ranks [0] have 1; ranks [1] have '<missing>'"]
