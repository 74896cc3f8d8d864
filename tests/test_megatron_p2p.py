"""CompressedP2PCommunicator on megatron-core's own schedules: CPU, gloo, torch.multiprocessing.spawn.

A tiny GPTModel (local layer spec, one transformer layer per virtual stage) runs the 1F1B and interleaved
schedules. Each spawn costs ~10 s of imports, so every spawned run checks many things (DESIGN section 4):

- pp=2 and pp=4: method ``none`` gives losses and gradients bitwise-identical to megatron-core's
  ``P2PCommunicator`` (1F1B batched/unbatched, interleaved, overlapped p2p, variable sequence lengths, and the
  ``install()`` path); pp=2 + interleaved + batch_p2p_comm is refused.
- TopK / k-bit training lowers the loss and meets the bytes/element targets on bf16 activations.
- EF21 / AQ-SGD state is identical on both sides of every cut (also with interleaving, where the chunk travels
  in the header); AQ-SGD's second epoch sends deltas; a resumed run equals an uninterrupted one; missing sample
  ids are an error; the inference switch sets the forward-only traffic.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import weakref

import pytest
import torch
from _dist import spawn

logger = logging.getLogger(__name__)

SEQ, MBS, HIDDEN, N_MICRO = 32, 2, 64, 4  # activations of 32 x 2 x 64 = 4096 elements per micro-batch
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "compression")
# Issue 4 targets in bytes per element on the wire, frame header included (bf16 activations).
TARGETS = {"topk10": 0.35, "q4": 0.55, "q8": 1.05}


# ----------------------------------------------------------------------------------------------------- harness


def _setup() -> None:
    # One intra-op thread per rank: with 2-4 ranks on 2 cores the default oversubscribes the cores and a step
    # takes 50x longer (measured: 3.5 s vs 0.065 s for pp=2).
    torch.set_num_threads(1)
    from distlion_ds.megatron import enable_cpu

    assert enable_cpu() and enable_cpu()  # idempotent


def _build(pp: int, vp: int = 1, *, dtype=torch.float32, batch_p2p=False, varseq=False, overlap=False, seed=1234):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        num_layers=pp * vp, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
        pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp if vp > 1 else None, batch_p2p_comm=batch_p2p,
        variable_seq_lengths=varseq, overlap_p2p_comm=overlap, deallocate_pipeline_outputs=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        # no MoE here; megatron-core's config check still wants this dispatcher with variable lengths
        moe_token_dispatcher_type="alltoall" if varseq else "allgather",
    )
    chunks = []
    for v in range(vp):
        m = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=128, max_sequence_length=SEQ,
                     pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                     post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v), vp_stage=v)
        chunks.append(Float16Module(cfg, m) if dtype == torch.bfloat16 else m)
    return cfg, chunks


def _data(varseq: bool = False, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(N_MICRO):
        s = [SEQ, SEQ // 2, 3 * SEQ // 4, SEQ // 4][i] if varseq else SEQ
        tokens = torch.randint(0, 128, (MBS, s), generator=g)
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                    "ids": torch.arange(i * MBS, (i + 1) * MBS)})
    return out


def _forward_step(data_iterator, model):
    from distlion_ds.megatron import set_sample_ids

    b = next(data_iterator)
    if getattr(model, "module", model).pre_process:  # first virtual stage: where the data is loaded
        set_sample_ids(b["ids"])
    pos = torch.arange(b["tokens"].shape[1]).unsqueeze(0).expand_as(b["tokens"])
    out = model(b["tokens"], pos, None, labels=b["labels"])

    def loss_func(o):
        loss = o.float().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def _step(chunks, data, comm=None, forward_only=False):
    """One forward_backward over ``data``; (per-micro-batch losses on the last stage, {param: grad})."""
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection

    kw = {}
    if comm is not None:
        kw = {"p2p_communicator": comm, "pg_collection": ProcessGroupCollection.use_mpu_process_groups()}
    for c in chunks:
        c.zero_grad(set_to_none=True)
    vp = len(chunks)
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=[iter(data) for _ in range(vp)] if vp > 1 else iter(data),
        model=chunks if vp > 1 else chunks[0], num_microbatches=len(data), seq_length=SEQ, micro_batch_size=MBS,
        forward_only=forward_only, **kw,
    )
    grads = {f"{i}.{n}": p.grad.clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()
             if p.grad is not None}
    return [x["loss"] for x in losses], grads


def _pp_group():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group()


def _comm(cfg, compression, **kw):
    from distlion_ds.compress import CompressionConfig, CompressionState
    from distlion_ds.megatron import CompressedP2PCommunicator

    c = CompressionConfig.from_json(compression)
    # an explicit state per run: runs with equal configs must not share EF / AQ-SGD state or byte counts
    return CompressedP2PCommunicator(_pp_group(), cfg, compression=c, state=kw.pop("state", CompressionState(c)),
                                     **kw)


def _bpe(comm, direction: str) -> float:
    s = comm.comm_stats()[direction]
    return s["bytes_sent"] / s["elements_sent"] if s["elements_sent"] else 0.0


def _assert_bitwise(ref, got, what: str) -> None:
    (l0, g0), (l1, g1) = ref, got
    assert len(l0) == len(l1) and all(torch.equal(a, b) for a, b in zip(l0, l1, strict=True)), what
    assert g0.keys() == g1.keys() and g0, what
    bad = [k for k in g0 if not torch.equal(g0[k], g1[k])]
    assert not bad, f"{what}: gradients differ for {bad}"


def _all_states(comm) -> list[dict]:
    """Every pipeline rank's compression state (feedback tensors, AQ-SGD buffers), gathered on all ranks."""
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, comm.state_dict())
    return out


def _feedback(state: dict, name: str) -> dict:
    return {tuple(shape): t for n, shape, t in state["feedback"]["tensors"] if n == name}


def _buffers(state: dict, name: str) -> dict:
    return {sid: t for n, sid, t in state["samples"]["buffers"] if n == name}


def _check_cuts_agree(states: list[dict], pp: int, n_cuts: int, aqsgd_samples: int | None, ef21: tuple[str, ...]):
    """For every cut: the sender's and the receiver's EF21 estimates / AQ-SGD buffers are bit-identical."""
    for v in range(n_cuts):
        stage, chunk = v % pp, v // pp
        s, r = states[stage], states[(stage + 1) % pp]  # forward sender / receiver of cut v
        for direction in ef21:
            # gradients cross the cut the other way: the forward receiver sends them
            snd, rcv = (s, r) if direction == "activations" else (r, s)
            ts = _feedback(snd, f"{stage}.{chunk}.{direction}.send")
            tr = _feedback(rcv, f"{stage}.{chunk}.{direction}.recv")
            assert ts and ts.keys() == tr.keys(), (v, direction, ts.keys(), tr.keys())
            assert all(torch.equal(ts[k], tr[k]) for k in ts), (v, direction)
        if aqsgd_samples is not None:
            bs = _buffers(s, f"{stage}.{chunk}.activations.send")
            br = _buffers(r, f"{stage}.{chunk}.activations.recv")
            assert len(bs) == aqsgd_samples and bs.keys() == br.keys(), (v, sorted(bs), sorted(br))
            assert all(torch.equal(bs[k], br[k]) for k in bs), v


def _write(out_dir: str, rank: int, metrics: dict) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(metrics, f)


def _read(out_dir: str, world: int) -> list[dict]:
    out = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out


# ----------------------------------------------------------------------------------------------------- pp = 2


def _pp2_worker(rank: int, world: int, out_dir: str) -> None:
    _setup()
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from distlion_ds.compress import CompressionState
    from distlion_ds.megatron import compression_state, install, uninstall

    metrics: dict = {}
    last = rank == world - 1

    # 1. lossless: bitwise equal to megatron-core's communicator
    for vp, batch, varseq in [(1, False, False), (1, True, False), (2, False, False), (1, False, True)]:
        cfg, chunks = _build(2, vp, batch_p2p=batch, varseq=varseq)
        data = _data(varseq)
        ref = _step(chunks, data, P2PCommunicator(_pp_group(), cfg))
        _assert_bitwise(ref, _step(chunks, data, _comm(cfg, f"{CONFIGS}/none.json")), f"vp={vp} batch={batch}")
        if (vp, batch, varseq) == (1, False, False):
            installed = install({})  # callers that pass no communicator get ours
            got = _step(chunks, data, comm=None)
            uninstall()
            _assert_bitwise(ref, got, "install()")
            # the per-call communicators shared the state the installed class holds
            assert installed.shared_state.stats["bytes_sent"] > 0
            assert compression_state({}) is installed.shared_state
            freed = weakref.ref(installed.shared_state)
            del installed
            gc.collect()
            assert freed() is None, "the shared state must be freed with install()'s class"
    cfg, _ = _build(2, 2, batch_p2p=True)
    try:
        _comm(cfg, {})
        raise AssertionError("pp=2 + interleaved + batch_p2p_comm must be refused")
    except ValueError as e:
        assert "batch_p2p_comm" in str(e)

    # 1b. the ranks agree before any frame: a different setting on one rank is refused on both, by name
    cfg, chunks = _build(2, 1)
    with pytest.raises(ValueError, match=r"compression\.activations\.ratio: ranks \[0\] have 0\.1; ranks \[1\] "
                                         r"have 0\.2"):
        _comm(cfg, {"activations": {"method": "topk", "ratio": 0.1 if rank == 0 else 0.2}})
    aq = _comm(cfg, f"{CONFIGS}/aqsgd_q4_cpu.json")
    aq.set_epoch(3)  # equal epochs pass
    with pytest.raises(ValueError, match=r"AQ-SGD epoch.*epoch: ranks \[0\] have 0; ranks \[1\] have 1"):
        aq.set_epoch(rank)  # warm-up on rank 0, deltas on rank 1: refused before a frame of either size is sent
    owner = _comm(cfg, {"activations": {"method": "topk", "feedback": "ef"}})
    freed = weakref.ref(owner.state)
    del owner
    gc.collect()
    assert freed() is None, "a communicator's state must be freed with it"

    # 2. lossy training on bf16 activations: loss goes down, bytes/element on target
    base = None
    for name, path in [("none", "none.json"), ("topk10", "topk10_q8.json"), ("q4", "q4_q8.json")]:
        cfg, chunks = _build(2, 1, dtype=torch.bfloat16)
        comm, data = _comm(cfg, f"{CONFIGS}/{path}"), _data()
        opt = torch.optim.Adam([p for c in chunks for p in c.parameters()], lr=3e-3)
        losses = []
        for _ in range(6):
            lo, _ = _step(chunks, data, comm)
            opt.step()
            losses.append(sum(x.item() for x in lo))
        metrics[name] = {"losses": losses, "act_bpe": _bpe(comm, "activations"), "grad_bpe": _bpe(comm, "gradients")}
        if last:
            assert losses[-1] < 0.93 * losses[0], (name, losses)
            base = base or losses
            assert abs(losses[0] - base[0]) < 0.01 * base[0], (name, losses[0], base[0])  # same start
        elif name != "none":
            assert metrics[name]["act_bpe"] <= TARGETS[name], metrics[name]
        if last and name != "none":
            assert metrics[name]["grad_bpe"] <= TARGETS["q8"], metrics[name]

    # 3. EF21 (both directions) and EF: both sides of the cut hold identical state after training steps
    cfg, chunks = _build(2, 1)
    comm = _comm(cfg, f"{CONFIGS}/q4_ef21.json")
    for _ in range(2):
        _step(chunks, _data(), comm)
    _check_cuts_agree(_all_states(comm), pp=2, n_cuts=1, aqsgd_samples=None, ef21=("activations", "gradients"))
    comm = _comm(cfg, f"{CONFIGS}/topk10_ef_q8.json")
    _step(chunks, _data(), comm)
    names = {n for n, _, _ in comm.state_dict()["feedback"]["tensors"]}
    assert names == ({"0.0.activations.send"} if rank == 0 else {"0.0.gradients.send"}), names  # EF: sender only

    # 4. AQ-SGD: warm-up epoch in full, then deltas; buffers equal on both sides; resume equals uninterrupted
    cfg, chunks = _build(2, 1)
    opt = torch.optim.SGD([p for c in chunks for p in c.parameters()], lr=0.1)
    data = _data()
    comm = _comm(cfg, f"{CONFIGS}/aqsgd_q4_cpu.json")
    comm.set_epoch(0)
    _step(chunks, data, comm)
    opt.step()
    warm = _bpe(comm, "activations")
    snapshot = ([{k: v.clone() if v is not None else v for k, v in c.state_dict().items()} for c in chunks],
                torch.utils._pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, comm.state_dict()))
    comm.set_epoch(1)
    sent0 = comm.comm_stats()["activations"]["bytes_sent"]
    uninterrupted = _step(chunks, data, comm)
    if rank == 0:
        delta = (comm.comm_stats()["activations"]["bytes_sent"] - sent0) / (N_MICRO * SEQ * MBS * HIDDEN)
        metrics["aqsgd"] = {"warmup_bpe": warm, "delta_bpe": delta}
        assert warm > 4.0 and delta < 0.55, metrics["aqsgd"]  # fp32 in full, then 4-bit deltas
    _check_cuts_agree(_all_states(comm), pp=2, n_cuts=1, aqsgd_samples=N_MICRO * MBS, ef21=())
    for c, sd in zip(chunks, snapshot[0], strict=True):  # restart from the snapshot with fresh objects
        c.load_state_dict(sd)
    comm2 = _comm(cfg, f"{CONFIGS}/aqsgd_q4_cpu.json")
    comm2.load_state_dict(snapshot[1])
    comm2.set_epoch(1)
    _assert_bitwise(uninterrupted, _step(chunks, data, comm2), "AQ-SGD resume")

    # 5. inference switch: forward-only under no_grad; no sample ids needed, training state untouched
    for inference, bound in (("compressed", TARGETS["q4"]), ("uncompressed", 4.1)):
        c = comm2.compression.model_copy(update={"inference": inference})
        comm3 = _comm(cfg, c, state=CompressionState(c))
        comm3.load_state_dict(snapshot[1] | {"config": c.model_dump()})
        n_buf, before = len(comm3.state.samples), comm3.comm_stats()["activations"]  # stats resume too
        with torch.no_grad():
            lo, _ = _step(chunks, data, comm3, forward_only=True)
        assert len(comm3.state.samples) == n_buf
        if rank == 0:
            after = comm3.comm_stats()["activations"]
            bpe = (after["bytes_sent"] - before["bytes_sent"]) / (after["elements_sent"] - before["elements_sent"])
            metrics[f"inference_{inference}"] = bpe
            assert bpe <= bound and (inference == "compressed" or bpe > 4.0), (inference, bpe)
        else:
            assert len(lo) == N_MICRO
    # missing sample ids: refused on the sender before anything is sent (rank 1 posts nothing)
    if rank == 0:
        x = torch.randn(SEQ, MBS, HIDDEN, requires_grad=True) * 1.0
        try:
            comm2.send_forward(x, is_last_stage=False)
            raise AssertionError("AQ-SGD without sample ids must be refused")
        except ValueError as e:
            assert "set_sample_ids" in str(e)
    _write(out_dir, rank, metrics)


@pytest.mark.slow
def test_pp2_megatron(tmp_path):
    spawn(_pp2_worker, 2, str(tmp_path))
    m = _read(str(tmp_path), 2)
    logger.info("pp=2 metrics: %s", m)
    assert m[0]["topk10"]["act_bpe"] <= TARGETS["topk10"] and m[0]["q4"]["act_bpe"] <= TARGETS["q4"]
    assert m[1]["q4"]["grad_bpe"] <= TARGETS["q8"]


# ----------------------------------------------------------------------------------------------------- pp = 4


def _pp4_worker(rank: int, world: int, out_dir: str) -> None:
    _setup()
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    metrics: dict = {}
    # 1. lossless, bitwise: 1F1B batched, interleaved batched, interleaved with overlapped p2p
    for vp, batch, overlap in [(1, True, False), (2, True, False), (2, False, True)]:
        cfg, chunks = _build(4, vp, batch_p2p=batch, overlap=overlap)
        data = _data()
        what = f"pp=4 vp={vp} batch={batch} overlap={overlap}"
        if overlap:
            # megatron-core's own communicator races here on gloo: deallocate_output_tensor swaps out the storage
            # of an activation whose isend is still in flight (measured: 1 of 3 runs gave different gradients).
            # Ours sends a separate frame buffer that the wait handle keeps alive, so it is compared with
            # deallocation both off (like the stock reference) and on.
            cfg.deallocate_pipeline_outputs = False
        ref = _step(chunks, data, P2PCommunicator(_pp_group(), cfg))
        _assert_bitwise(ref, _step(chunks, data, _comm(cfg, {})), what)
        if overlap:
            cfg.deallocate_pipeline_outputs = True
            _assert_bitwise(ref, _step(chunks, data, _comm(cfg, {})), what + " deallocate")

    # 2. interleaved, stateful feedback in both directions: the header routes each model chunk's state
    compression = {"activations": {"method": "quantize", "bits": 4, "feedback": "aqsgd"},
                   "gradients": {"method": "quantize", "bits": 8, "feedback": "ef21"}}
    cfg, chunks = _build(4, 2, overlap=True)
    comm = _comm(cfg, compression)
    opt = torch.optim.Adam([p for c in chunks for p in c.parameters()], lr=3e-3)
    losses = []
    for epoch in range(3):
        comm.set_epoch(epoch)
        lo, _ = _step(chunks, _data(), comm)
        opt.step()
        losses.append(sum(x.item() for x in lo))
        if epoch == 0:
            warm = _bpe(comm, "activations")
    metrics["interleaved"] = {"losses": losses, "warmup_bpe": warm, "avg_bpe": _bpe(comm, "activations")}
    # 7 cuts between 8 virtual stages; every one carries all 8 samples and an EF21 gradient stream
    _check_cuts_agree(_all_states(comm), pp=4, n_cuts=7, aqsgd_samples=N_MICRO * MBS, ef21=("gradients",))
    if rank == world - 1:
        assert losses[-1] < losses[0], losses
    # stateful gradients behind stateless activations: the forward header must still name the model chunk
    comm = _comm(cfg, {"activations": {"method": "topk"}, "gradients": {"method": "quantize", "feedback": "ef21"}})
    _step(chunks, _data(), comm)
    _check_cuts_agree(_all_states(comm), pp=4, n_cuts=7, aqsgd_samples=None, ef21=("gradients",))
    _write(out_dir, rank, metrics)


@pytest.mark.slow
def test_pp4_megatron(tmp_path):
    spawn(_pp4_worker, 4, str(tmp_path))
    m = _read(str(tmp_path), 4)
    logger.info("pp=4 metrics: %s", m)
    assert m[0]["interleaved"]["avg_bpe"] < m[0]["interleaved"]["warmup_bpe"]


# ----------------------------------------------------------------------------------------------------- one process


def test_pinned_private_signatures():
    """install() and the subclass rely on these megatron-core internals; fail loudly when they change."""
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    params = list(inspect.signature(p2p_communication.P2PCommunicator._communicate).parameters)
    assert params == ["self", "tensor_send_next", "tensor_send_prev", "recv_prev", "recv_next", "tensor_shape",
                      "wait_on_reqs"]
    assert list(inspect.signature(p2p_communication.P2PCommunicator.__init__).parameters) == [
        "self", "pp_group", "config"]
    for fn in ("_batched_p2p_ops", "_p2p_ops"):
        assert list(inspect.signature(getattr(p2p_communication, fn)).parameters) == [
            "tensor_send_prev", "tensor_recv_prev", "tensor_send_next", "tensor_recv_next", "group",
            "prev_pipeline_rank", "next_pipeline_rank"]
    for sched in (schedules.forward_backward_pipelining_without_interleaving,
                  schedules.forward_backward_pipelining_with_interleaving):
        src = inspect.getsource(sched)
        assert "p2p_communicator = P2PCommunicator(\n            pp_group=" in src


def test_install_idempotent(caplog):
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    from distlion_ds.megatron import CompressedP2PCommunicator, install, is_installed, uninstall

    original = schedules.P2PCommunicator
    assert original is p2p_communication.P2PCommunicator and not is_installed()
    try:
        with caplog.at_level(logging.INFO, logger="distlion_ds.megatron.install"):
            a = install(f"{CONFIGS}/topk10_q8.json")
            b = install({"activations": {"method": "topk", "ratio": 0.1},
                         "gradients": {"method": "quantize", "bits": 8}})  # equal config: no-op
        assert a is b is schedules.P2PCommunicator and issubclass(a, CompressedP2PCommunicator)
        assert len(caplog.records) == 1
        assert a.compression.activations.method == "topk"
        c = install(f"{CONFIGS}/q8.json")
        assert c is not a and schedules.P2PCommunicator is c
    finally:
        uninstall()
        uninstall()
    assert schedules.P2PCommunicator is original and not is_installed()


def test_enable_cpu_idempotent_and_noop_with_cuda(monkeypatch):
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    from distlion_ds.megatron import cpu

    fork = CudaRNGStatesTracker.fork
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.enable_cpu() is False
    assert CudaRNGStatesTracker.fork is fork and not hasattr(torch.cuda, cpu._MARKER)
    monkeypatch.undo()
    try:
        assert cpu.enable_cpu() is True and cpu.enable_cpu() is True
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.empty(3, device="cuda").device.type == "cpu"
        assert torch.zeros(2).cuda().device.type == "cpu" and torch.ones(1).to("cuda").device.type == "cpu"
        torch.cuda.synchronize()
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 123)
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
        torch.manual_seed(123)
        assert torch.equal(a, torch.rand(4))  # the fork drew from the tracked seed
    finally:
        cpu.disable_cpu()
    assert CudaRNGStatesTracker.fork is fork and not hasattr(torch.cuda, cpu._MARKER)
