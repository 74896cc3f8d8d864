"""Compressed tied-embedding all-reduce (distlion_ds.megatron.tied) inside megatron-core's finalize_model_grads.

One pp=2 spawn (2 gloo ranks, enable_cpu) of a tiny GPTModel with tied embeddings, wrapped in megatron-core's
DistributedDataParallel, trained through megatron-core's 1F1B schedule with ``config.finalize_model_grads_func``:

- ``method: none``: the tied gradient equals megatron-core's own fp32 all-reduce bit for bit (and the oracle
  g_first + g_last), both copies identical, bytes = 4 B/element;
- 8-bit quantize + EF and TopK + EF for several SGD steps: after every step the two copies of the embedding are
  bit-identical, the reduced gradient equals an oracle written here from the kernel references (each rank's
  g + e quantized / top-k'd, decoded, summed first-stage-first), the residual equals x - D(C(x)), and the bytes per
  channel equal the payload sizes computed here from the config;
- the state store: a new callable given the old one's state (or its ``state_dict`` after a round trip) continues
  bit for bit, stochastic rounding included; ``dist_checkpointing`` save / load gives each rank its own residual
  back; a state of another shape is refused;
- the ranks refuse a disagreeing config;
- the interleaved schedule (pp=2 x vp=2), where the copies live on different model chunks of the two ranks.

Single-process tests pin every megatron-core private name the seam relies on, and the config errors.
"""

from __future__ import annotations

import copy
import inspect
import json
import math

import pytest
import torch
from _dist import spawn

SEQ, MBS, HIDDEN, VOCAB, N_MICRO = 16, 2, 32, 96, 2
LR = 0.05


# ------------------------------------------------------------------------------------------------ pinned contract

# megatron-core private names the seam relies on (identical in 0.16.1 and 0.19.0): name -> parameters (name=default).
PINNED = {
    "finalize_model_grads": "model, num_tokens=None, pg_collection=None, force_all_reduce=False",
    "_allreduce_word_embedding_grads": "model, config, embd_group=None, pp_group=None",
    "_allreduce_embedding_grad": "model, embd_group, pp_group, weight_getter, skip_if_none=True, config=None",
    "_get_shared_word_embedding_weight": "model_module, config",
    "_get_main_grad_attr": "param",
}


def _params(fn) -> str:
    out = []
    for p in inspect.signature(fn).parameters.values():
        out.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return ", ".join(out)


def test_pinned_megatron_private_signatures():
    import importlib

    from megatron.core import parallel_state

    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    for name, want in PINNED.items():
        assert _params(getattr(fmg, name)) == want, name
    # finalize_model_grads looks the word-embedding step up as a module global at call time (the seam rebinds it)
    assert "_allreduce_word_embedding_grads" in fmg.finalize_model_grads.__code__.co_names
    # ... and _allreduce_embedding_grad returns early when the weight getter gives None (how we keep megatron's
    # choice of chunk and weight but skip its all-reduce): the early return is on weight None with skip_if_none.
    src = inspect.getsource(fmg._allreduce_embedding_grad)
    assert "if weight is None and skip_if_none:" in src
    assert _params(parallel_state.get_embedding_group) == "check_initialized=True"

    from distlion_ds.megatron import tied

    # the callable keeps finalize_model_grads's parameters
    cb = tied.finalize_model_grads_with({"method": "none"})
    assert _params(cb) == PINNED["finalize_model_grads"]
    assert tied.finalize_model_grads_with(None) is fmg.finalize_model_grads


def test_seam_restores_the_module_global():
    import importlib

    from distlion_ds.megatron import tied

    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    original = fmg._allreduce_word_embedding_grads
    seen = []

    def fake_finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        seen.append(fmg._allreduce_word_embedding_grads)
        raise RuntimeError("boom")

    cb = tied.CompressedFinalizeModelGrads({"method": "quantize", "feedback": "ef"}, finalize=fake_finalize)
    with pytest.raises(RuntimeError, match="boom"):
        cb([])
    assert seen and seen[0] is not original  # swapped during the call
    assert fmg._allreduce_word_embedding_grads is original  # restored after a failure too


# ------------------------------------------------------------------------------------------------------ config


def test_config_accepts_and_refuses(tmp_path):
    from distlion_ds.megatron.tied import tied_embedding_config

    c = tied_embedding_config({"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"})
    assert (c.method, c.bits, c.block_size, c.feedback) == ("quantize", 8, 256, "ef")
    c = tied_embedding_config('{"method": "topk", "ratio": 0.05, "feedback": "ef"}')
    assert (c.method, c.ratio) == ("topk", 0.05)
    f = tmp_path / "tied.json"
    f.write_text(json.dumps({"method": "none"}))
    assert tied_embedding_config(str(f)).method == "none"
    bad = [
        ({"method": "quantize", "feedback": "ef21"}, r"tied_embedding_compression\.feedback: 'ef21'.*none, ef"),
        ({"method": "topk", "feedback": "aqsgd"}, r"tied_embedding_compression\.feedback"),
        ({"method": "zip"}, r"tied_embedding_compression\.method: unknown codec 'zip'.*quantize"),
        ({"method": "quantize", "bits": 3}, r"tied_embedding_compression\.bits.*got 3"),
        ({"method": "topk", "ratio": 0}, r"tied_embedding_compression\.ratio.*got 0"),
        ({"method": "quantize", "blocks": 256}, r"tied_embedding_compression.*unknown key.*blocks"),
        ("no/such/file.json", r"tied_embedding_compression: 'no/such/file.json' is neither"),
        ("{not json", r"tied_embedding_compression: invalid JSON"),
        (3, r"tied_embedding_compression: expected a dict"),
        ([1], r"expected a dict"),
    ]
    for value, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            tied_embedding_config(value)
    with pytest.raises(ValueError, match=r"--tied-embedding-compression\.bits"):
        tied_embedding_config({"method": "quantize", "bits": 5}, key="--tied-embedding-compression")
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        tied_embedding_config(str(f))


def test_state_refuses_another_shape_and_unknown_keys():
    from distlion_ds.megatron.tied import TiedEmbeddingState

    s = TiedEmbeddingState()
    s.residuals["word_embeddings"] = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"shape \(4, 3\), the gradient \(5, 3\)"):
        s.residual("word_embeddings", torch.zeros(5, 3))
    with pytest.raises(ValueError, match="unknown key"):
        s.load_state_dict({"residuals": {}, "transfers": {}, "extra": 1})


# ------------------------------------------------------------------------------------------------ oracles


def _quantize_oracle(x: torch.Tensor, bits: int, block: int, out_dtype=torch.float32) -> torch.Tensor:
    """fp32 decode of x's k-bit codes; ``out_dtype``: the dtype the decode rounds to (the wire dtype)."""
    from distlion_ds.kernels import dequantize_ref, quantize_ref

    codes, scales = quantize_ref(x.reshape(-1).float(), bits, block)
    return dequantize_ref(codes, scales, bits, block, x.numel(), out_dtype).view(x.shape).float()


def _topk_oracle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = x.reshape(-1).float()
    k = min(flat.numel(), max(1, round(ratio * flat.numel())))
    # the k largest |x|, ties to the lower index (DESIGN 3.3): a stable sort on -|x|
    order = torch.sort(-flat.abs(), stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.view(x.shape)


def _quantize_bytes(numel: int, bits: int, block: int) -> int:
    return 4 * math.ceil(numel / block) + math.ceil(numel * bits / 8)


def _topk_bytes(numel: int, ratio: float, itemsize: int) -> int:
    k = min(numel, max(1, round(ratio * numel)))
    width = max(1, (numel - 1).bit_length())
    return k * itemsize + min(math.ceil(numel / 8), math.ceil(k * width / 8))


# ------------------------------------------------------------------------------------------------ spawned run


def _build(pp: int, vp: int = 1):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    cfg = TransformerConfig(num_layers=pp * vp, hidden_size=HIDDEN, num_attention_heads=4,
                            use_cpu_initialization=True, pipeline_dtype=torch.float32, pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
                            hidden_dropout=0.0, attention_dropout=0.0)
    chunks = []
    for v in range(vp):
        model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                         pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                         post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v),
                         share_embeddings_and_output_weights=True, vp_stage=v)
        chunks.append(DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model,
                                              disable_bucketing=v > 0))
    return cfg, chunks


def _batches(step: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(N_MICRO):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ)})
    return out


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

    def loss_func(per_token):
        return per_token.float().mean(), {"loss": per_token.float().mean().detach()}

    return out, loss_func


def _run_step(cfg, chunks, step: int, finalize):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for c in chunks:
        c.zero_grad_buffer()
    cfg.finalize_model_grads_func = finalize
    data = [iter(_batches(step)) for _ in chunks] if len(chunks) > 1 else iter(_batches(step))  # one per chunk
    get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=data, model=chunks,
                                num_microbatches=N_MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)


def _sgd(chunks) -> None:
    with torch.no_grad():
        for c in chunks:
            for p in c.module.parameters():
                p.sub_(LR * p.main_grad.to(p.dtype))


def _tied_weight(chunks):
    """The copy this rank holds: the input embedding (first stage, first chunk) or the output layer (last stage,
    last chunk), as megatron-core's finalize_model_grads picks it."""
    from megatron.core import parallel_state as ps

    chunk = chunks[0] if ps.is_pipeline_first_stage(ignore_virtual=True) else chunks[-1]
    return chunk.module.shared_embedding_or_output_weight()


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


class _Capture:
    """A finalize wrapper that records this rank's tied gradient (and EF residual) before the reduction."""

    def __init__(self, inner, weight, state=None):
        self.inner, self.weight, self.state = inner, weight, state
        self.pre: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def __call__(self, model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        self.pre = self.weight.main_grad.detach().clone()
        if self.state is not None:
            self.residual = self.state.residual("word_embeddings", self.pre).clone()
        return self.inner(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


def _worker(rank: int, world: int, ckpt_dir: str) -> None:
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    from distlion_ds.megatron import enable_cpu
    from distlion_ds.megatron.tied import CompressedFinalizeModelGrads, TiedEmbeddingState, finalize_model_grads_with

    enable_cpu()
    cfg, chunks = _build(pp=2)
    group = ps.get_embedding_group()
    me = torch.distributed.get_rank(group)
    weight = _tied_weight(chunks)
    numel = weight.numel()
    assert weight.main_grad.dtype == torch.float32

    # --- 1. method none == megatron-core's own fp32 all-reduce, bit for bit, and == the oracle g_first + g_last.
    none = finalize_model_grads_with({"method": "none"})
    for step in range(2):
        cap = _Capture(megatron_finalize, weight)
        _run_step(cfg, chunks, step, cap)
        theirs = weight.main_grad.clone()
        cap2 = _Capture(none, weight)
        _run_step(cfg, chunks, step, cap2)
        ours = weight.main_grad.clone()
        assert torch.equal(cap.pre, cap2.pre)  # the schedule itself is deterministic
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), "method none != megatron all-reduce"
        pres = _gather(cap.pre, group)
        assert torch.equal(ours, pres[0] + pres[1])
        assert not torch.equal(pres[0], pres[1])  # the two copies' gradients really differ before the sum
        copies = _gather(ours, group)
        assert torch.equal(copies[0], copies[1])
    s = none.comm_stats()
    assert s["word_embeddings"] == {"bytes_sent": 2 * numel * 4, "bytes_received": 2 * numel * 4,
                                    "elements_sent": 2 * numel, "transfers": 2, "fp32_allreduce_bytes": 2 * numel * 4}
    assert s["bytes_sent"] == 2 * numel * 4

    # --- 2. compressed + EF, several SGD steps: copies identical after every step, oracle, residual, bytes.
    cases = [
        ({"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"},
         lambda x: _quantize_oracle(x, 8, 256), _quantize_bytes(numel, 8, 256)),
        ({"method": "topk", "ratio": 0.1, "feedback": "ef"},
         lambda x: _topk_oracle(x, 0.1), _topk_bytes(numel, 0.1, 4)),
        ({"method": "quantize", "bits": 4, "block_size": 64, "feedback": "none"},
         lambda x: _quantize_oracle(x, 4, 64), _quantize_bytes(numel, 4, 64)),
    ]
    steps = 3
    for config, oracle, payload in cases:
        start = [p.detach().clone() for c in chunks for p in c.module.parameters()]
        fin = CompressedFinalizeModelGrads(config)
        ef = config["feedback"] == "ef"
        residual_seen = False
        for step in range(steps):
            cap = _Capture(fin, weight, fin.state if ef else None)
            _run_step(cfg, chunks, 10 + step, cap)
            reduced = weight.main_grad.clone()
            pres = _gather(cap.pre, group)
            res = _gather(cap.residual, group) if ef else [torch.zeros_like(reduced)] * 2
            xs = [pres[r] + res[r] for r in range(2)] if ef else pres
            decoded = [oracle(x) for x in xs]
            want = decoded[0].clone().add_(decoded[1])
            assert torch.equal(reduced, want), (config, step)
            assert not torch.equal(reduced, pres[0] + pres[1])  # it is lossy: the oracle is not the plain sum
            if ef:
                new_res = fin.state.residuals["word_embeddings"]
                assert torch.equal(new_res, xs[me] - decoded[me])
                residual_seen |= bool(new_res.abs().max() > 0)
            _sgd(chunks)
            copies = _gather(weight.detach(), group)
            assert torch.equal(copies[0], copies[1]), f"tied copies differ after step {step} with {config}"
        assert residual_seen or not ef
        s = fin.comm_stats()["word_embeddings"]
        assert s == {"bytes_sent": steps * payload, "bytes_received": steps * payload,
                     "elements_sent": steps * numel, "transfers": steps,
                     "fp32_allreduce_bytes": steps * numel * 4}, (config, s)
        assert payload < numel * 4 / 3  # at least 3x fewer bytes than fp32 on this small embedding
        with torch.no_grad():  # back to the same start for the next case
            for p, p0 in zip([p for c in chunks for p in c.module.parameters()], start, strict=True):
                p.copy_(p0)

    # --- 3. the state outlives the callable: same bits with stochastic rounding, through state_dict too.
    config = {"method": "quantize", "bits": 4, "block_size": 64, "stochastic": True, "feedback": "ef"}
    a = CompressedFinalizeModelGrads(config)
    _run_step(cfg, chunks, 20, a)
    saved = copy.deepcopy(a.state.state_dict())
    assert saved["transfers"] == {"word_embeddings": 1}
    _run_step(cfg, chunks, 21, a)
    continued = weight.main_grad.clone()
    fresh_state = TiedEmbeddingState()
    fresh_state.load_state_dict(saved)
    b = finalize_model_grads_with(config, state=fresh_state)
    _run_step(cfg, chunks, 21, b)
    assert torch.equal(weight.main_grad, continued)
    assert torch.equal(b.state.residuals["word_embeddings"], a.state.residuals["word_embeddings"])
    c = finalize_model_grads_with(config)  # without the state: the residual and the seeds restart -> other bits
    _run_step(cfg, chunks, 21, c)
    assert not torch.equal(weight.main_grad, continued)
    # through megatron-core's dist_checkpointing: one object per rank, each rank gets its own back
    from megatron.core import dist_checkpointing

    dist_checkpointing.save({"tied": a.state.sharded_state_dict()}, ckpt_dir)
    restored = TiedEmbeddingState()
    loaded = dist_checkpointing.load({"tied": restored.sharded_state_dict()}, ckpt_dir)
    restored.load_state_dict(loaded["tied"])
    assert restored.transfers == a.state.transfers == {"word_embeddings": 2}
    assert torch.equal(restored.residuals["word_embeddings"], a.state.residuals["word_embeddings"])
    ends = _gather(restored.residuals["word_embeddings"], group)
    assert not torch.equal(ends[0], ends[1])  # each end of the embedding group has its own residual back

    # --- 4. the compressor alone on the embedding group: bf16 and fp16 gradients (encoded as fp32 with EF, in their
    # own dtype without), sizes not divisible by the block, an all-zero gradient; both ranks get the same bits.
    from distlion_ds.megatron.tied import TiedEmbeddingCompressor

    g = torch.Generator().manual_seed(50 + me)
    for dtype in (torch.bfloat16, torch.float16):
        for feedback in ("ef", "none"):
            comp = TiedEmbeddingCompressor({"method": "quantize", "bits": 8, "block_size": 64, "feedback": feedback})
            for shape in ((37, 5), (8, 8)):
                for zero in (False, True):
                    grad = torch.zeros(shape, dtype=dtype) if zero else torch.randn(shape, generator=g).to(dtype)
                    channel = f"test{shape}"  # one residual per stream (a shape change is refused, tested above)
                    x = grad.float() + comp.state.residual(channel, grad) if feedback == "ef" else grad
                    xs = _gather(x, group)
                    comp.all_reduce_(grad, group, channel)
                    # without EF the payload is the gradient's own dtype, decoded to it, summed in fp32
                    wire_dtype = torch.float32 if feedback == "ef" else dtype
                    want = _quantize_oracle(xs[0], 8, 64, wire_dtype) + _quantize_oracle(xs[1], 8, 64, wire_dtype)
                    assert grad.dtype == dtype and torch.equal(grad, want.to(dtype)), (dtype, feedback, shape, zero)
                    copies = _gather(grad, group)
                    assert torch.equal(copies[0], copies[1])
                    if zero and feedback == "none":
                        assert not grad.any()
            wire = 4 if feedback == "ef" else 2
            assert comp.payload_bytes(torch.zeros(37, 5, dtype=dtype)) == 4 * 3 + 185  # not divisible by 64
            assert comp.wire_dtype(torch.zeros(1, dtype=dtype)).itemsize == wire

    # --- 5. ranks that disagree on the config are refused on every rank, naming the setting.
    bad = CompressedFinalizeModelGrads({"method": "quantize", "bits": 8 if me == 0 else 4})
    try:
        _run_step(cfg, chunks, 30, bad)
    except ValueError as e:
        assert "disagrees on config" in str(e) and "group rank 1" in str(e), e
    else:
        raise AssertionError("a disagreeing config was not refused")

    # --- 6. interleaved schedule (pp=2 x vp=2): the copies sit on chunk 0 of the first rank and chunk 1 of the
    # last; method none == megatron-core's all-reduce, and compressed + EF keeps the copies identical.
    cfg, chunks = _build(pp=2, vp=2)
    group = ps.get_embedding_group()
    weight = _tied_weight(chunks)
    _run_step(cfg, chunks, 40, megatron_finalize)
    theirs = weight.main_grad.clone()
    _run_step(cfg, chunks, 40, finalize_model_grads_with({"method": "none"}))
    assert torch.equal(weight.main_grad.view(torch.int32), theirs.view(torch.int32))
    fin = CompressedFinalizeModelGrads({"method": "topk", "ratio": 0.05, "feedback": "ef"})
    for step in range(2):
        _run_step(cfg, chunks, 41 + step, fin)
        _sgd(chunks)
        copies = _gather(weight.detach(), group)
        assert torch.equal(copies[0], copies[1]), f"interleaved: tied copies differ after step {step}"
    assert fin.comm_stats()["word_embeddings"]["transfers"] == 2
    ps.destroy_model_parallel()


def test_tied_embedding_pp2(tmp_path):
    (tmp_path / "ckpt").mkdir()
    spawn(_worker, 2, str(tmp_path / "ckpt"))
