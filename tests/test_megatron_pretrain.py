"""``python -m distlion_ds.megatron.pretrain_gpt`` and its launch scripts, end to end on CPU / gloo.

One 4-process spawn (pp=2 x dp=2) runs several trainings through ``main()`` in-process (imports are paid once,
DESIGN section 4), all on megatron-core's DDP, schedules, finalize_model_grads and dist_checkpointing: D-Lion + TopK
p2p (zero DP gradient bytes), AdamW through megatron-core's own optimizer, the interleaved schedule with EF, overlapped
DDP hooks and compressed tied embeddings, and the resume checks (2k iterations == k + save + load + k, bit for bit:
every tensor of the checkpoint, D-Lion momentum per DP rank, dropout RNG, the LR schedule, AQ-SGD buffers across an
epoch boundary, the tied-embedding EF residual; AdamW and local-step D-Lion (resumed mid-round) too). The launch
scripts run under torchrun as users run them: ``launch/megatron_gpt.sh`` (pp=2) and ``launch/3d_gpt.sh`` (tp=2 x
pp=2 x dp=2, 8 processes, STEPS=2).
Argument errors are checked in-process. Data: a 25-file slice of the stdlib, 512-piece tokenizer (~5 s to prepare).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from _dist import free_port, spawn

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "compression"
logger = logging.getLogger(__name__)
# pp=2 x dp=2: 2 micro-batches of 2 per DP rank and iteration
BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--eval-iters", "1", "--log-interval", "1"]


def _summary(out: pathlib.Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _script_env() -> dict:
    # The workers time nothing here, but the Triton interpreter would make every codec call ~100x slower: without
    # the flag CPU tensors take the torch references. torchrun comes from this interpreter's environment.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MASTER_PORT"] = str(free_port())
    return env


# ----------------------------------------------------------------------------------------------- pp=2 x dp=2


TIED_EF = '{"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"}'


def _pp2_dp2_worker(rank: int, world: int, data: str, out: str) -> None:
    import distlion_ds.kernels._dispatch as dispatch
    from distlion_ds.megatron import pretrain_gpt

    dispatch.INTERPRET = False  # torch references on CPU tensors (the interpreter is ~100x slower)
    torch.set_num_threads(1)  # 4 ranks on 2 cores: more threads only oversubscribe
    out_dir = pathlib.Path(out)
    common = [*BASE, "--data-path", data, "--pipeline-model-parallel-size", "2"]

    def run(name: str, *extra: str) -> None:
        assert pretrain_gpt.main([*common, "--out", str(out_dir / name), *extra]) == 0, name

    run("dlion_topk", "--optimizer", "distlion", "--lr", "3e-3", "--min-lr", "3e-4", "--train-iters", "6",
        "--p2p-compression", str(CONFIGS / "topk10_q8.json"))
    run("adam", "--optimizer", "adam", "--lr", "3e-3", "--train-iters", "3")
    # Interleaved 1F1B, Megatron-LM's spelling of D-Lion, overlapped DDP hooks, compressed tied embeddings.
    run("interleaved", "--distlion", "--dlion-aggregation", "avg", "--train-iters", "2", "--num-layers", "4",
        "--num-layers-per-virtual-pipeline-stage", "1", "--p2p-compression", str(CONFIGS / "topk10_ef_q8.json"),
        "--overlap-grad-reduce", "--clip-grad", "0", "--tied-embedding-compression", TIED_EF)

    # Resume: AQ-SGD epochs of 2 iterations (16 samples), so the resumed half sends deltas against buffers that
    # only the checkpoint holds; dropout on (RNG state), warm-up + cosine (scheduler state), the tied-embedding EF
    # residual (side file).
    resume = ["--optimizer", "distlion", "--lr", "3e-3", "--lr-warmup-iters", "1", "--train-iters", "4",
              "--eval-interval", "2", "--epoch-samples", "16", "--p2p-compression", str(CONFIGS / "aqsgd_q4_cpu.json"),
              "--tied-embedding-compression", TIED_EF]
    run("full", *resume, "--save", str(out_dir / "ckpt_full"))
    run("part1", *resume, "--exit-interval", "2", "--save", str(out_dir / "ckpt_part"))
    run("part2", *resume, "--load", str(out_dir / "ckpt_part"), "--save", str(out_dir / "ckpt_part"))
    with pytest.raises(ValueError, match="saved with"):  # every rank refuses, so no collective is left waiting
        pretrain_gpt.main([*common, *resume, "--optimizer", "adam", "--load", str(out_dir / "ckpt_part"),
                           "--out", str(out_dir / "refused")])
    # AdamW (megatron-core's own optimizer and its sharded state) resumes exactly too.
    adam = ["--optimizer", "adam", "--lr", "3e-3", "--train-iters", "3", "--eval-iters", "0"]
    run("adam_full", *adam, "--save", str(out_dir / "ckpt_adam_full"))
    run("adam_part1", *adam, "--exit-interval", "1", "--save", str(out_dir / "ckpt_adam"))
    run("adam_part2", *adam, "--load", str(out_dir / "ckpt_adam"), "--save", str(out_dir / "ckpt_adam"))
    # Local steps (H=2, megatron-core's AdamW inside, 1-bit outer votes), resumed mid-round (after iteration 1).
    local = ["--distlion", "--dlion-local-steps", "2", "--dlion-outer-lr", "1e-3", "--lr", "3e-3", "--train-iters",
             "4", "--eval-iters", "0"]
    run("local_full", *local, "--save", str(out_dir / "ckpt_local_full"))
    run("local_part1", *local, "--exit-interval", "1", "--save", str(out_dir / "ckpt_local"))
    run("local_part2", *local, "--load", str(out_dir / "ckpt_local"), "--save", str(out_dir / "ckpt_local"))


@pytest.fixture(scope="module")
def pp2_dp2(tiny_data, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("pp2_dp2")
    t0 = time.perf_counter()
    spawn(_pp2_dp2_worker, 4, tiny_data, str(out))
    logger.info("pp=2 x dp=2 spawn: %.1f s", time.perf_counter() - t0)
    return out


def _check_common(s: dict, tp: int, pp: int, dp: int, steps: int) -> None:
    assert (s["tp"], s["pp"], s["dp"], s["steps"]) == (tp, pp, dp, steps)
    assert len(s["losses"]) == steps and all(math.isfinite(x) for x in s["losses"]), s["losses"]
    assert s["dp_replicas_identical"] is True
    assert s["tp_replicated_params_identical"] is True
    assert s["skipped_steps"] == 0


def _ring(numel: int, n: int) -> int:
    return 2 * (n - 1) * numel * 4 // n


@pytest.mark.slow
def test_pp2_dp2_training(pp2_dp2):
    s = _summary(pp2_dp2 / "dlion_topk")
    _check_common(s, 1, 2, 2, 6)
    assert s["tied_embeddings_identical"] is True
    assert s["losses"][0] == pytest.approx(math.log(512), rel=0.02)  # untrained: uniform over the vocab
    assert s["losses"][-1] < s["losses"][0] - 0.1 and s["eval"][-1]["val_loss"] < s["losses"][0], s["losses"]
    w = s["wire"]
    # MaVo at N=2: (1 + 1)(N-1)/N = 1 bit per parameter and step, plus bucket padding and the flag byte
    assert 1.0 <= w["dlion"]["bits_per_param_step"] < 1.05, w["dlion"]
    assert w["p2p_activations"]["bytes_per_element"] < 0.6  # TopK 10 %: values + indices + header, vs 4 (fp32)
    assert 1.0 < w["p2p_gradients"]["bytes_per_element"] < 1.1  # 8-bit codes + block scales
    # No fp32 gradient byte on the DP group with D-Lion; megatron-core's fp32 tied-embedding all-reduce: a ring
    # over the 2 ends (vocab 512 x hidden 32) per iteration on each of the 4 ranks holding a copy.
    assert w["dp_allreduce"] == 0
    assert w["embedding_allreduce"] == 4 * 6 * _ring(512 * 32, 2) and w["embedding_allreduce_compressed"] is False

    a = _summary(pp2_dp2 / "adam")
    _check_common(a, 1, 2, 2, 3)
    assert a["optimizer"] == "adam" and a["tied_embeddings_identical"] is True and a["losses"][-1] < a["losses"][0]
    assert a["wire"]["dlion"] is None and a["wire"]["dp_allreduce"] > 0 and a["wire"]["p2p_activations"] is None
    # megatron-core's DDP all-reduces every gradient bucket in fp32: at least the model's parameters, per rank
    assert a["wire"]["dp_allreduce"] >= 3 * _ring(a["params"], 2), (a["wire"], a["params"])

    i = _summary(pp2_dp2 / "interleaved")
    _check_common(i, 1, 2, 2, 2)
    assert i["vp"] == 2 and i["tied_embeddings_identical"] is True and i["aggregation"] == "avg"
    assert i["overlap_grad_reduce"] is True and i["wire"]["embedding_allreduce_compressed"] is True
    # 8-bit codes + one fp32 scale per 256: (512 x 32) x (1 + 4/256) B per payload, to the 1 other end, 2 iterations
    # on 4 ranks; against the fp32 ring (4 B/element).
    assert i["wire"]["embedding_allreduce"] == pytest.approx(4 * 2 * 512 * 32 * (1 + 4 / 256), rel=0.01)


@pytest.mark.slow
def test_resume_is_exact(pp2_dp2, tmp_path):
    from _mcore_ckpt import assert_same, contents

    full, p1, p2 = (_summary(pp2_dp2 / n) for n in ("full", "part1", "part2"))
    assert full["losses"][:2] == p1["losses"] and full["losses"][2:] == p2["losses"], (full, p1, p2)
    assert p2["start_iteration"] == 2 and p2["end_iteration"] == 4
    assert full["eval"] == p1["eval"] + p2["eval"]
    a = contents(pp2_dp2 / "ckpt_full" / "iter_0000004", tmp_path / "a.pt")
    b = contents(pp2_dp2 / "ckpt_part" / "iter_0000004", tmp_path / "b.pt")
    # one side file per rank (RNG, p2p and tied-embedding compression state); D-Lion momentum per DP rank
    assert sorted(k for k in a if k.startswith("rank_state/")) == [
        f"rank_state/mp_rank_00_{pp:03d}_dp{dp:03d}.pt" for pp in (0, 1) for dp in (0, 1)]
    assert any(k.startswith("dcp/optimizer.distlion.exp_avg_per_dp_rank.") and v.shape[0] == 2
               for k, v in a.items() if torch.is_tensor(v))
    assert all(a[k]["tied"]["residuals"] for k in a if k.startswith("rank_state/")), "no tied-embedding EF state"
    assert_same(a, b, "iteration 4", skip=("_extra_state",))
    # AQ-SGD: the first epoch crosses the cut in full (fp32, > 4 B/element), the resumed second epoch as 4-bit
    # deltas (~0.53); each half also holds one evaluation, sent 4-bit ("inference": "compressed"), which pulls
    # the first half's average down to ~2.9.
    warm, delta = p1["wire"]["p2p_activations"], p2["wire"]["p2p_activations"]
    assert warm["bytes_per_element"] > 2.0 and delta["bytes_per_element"] < 0.6, (warm, delta)

    lf, l1, l2 = (_summary(pp2_dp2 / n) for n in ("local_full", "local_part1", "local_part2"))
    assert lf["losses"] == l1["losses"] + l2["losses"], (lf, l1, l2)
    # mid-round (iteration 1 of H=2) the DP replicas differ by design; after the outer step of round 2 they agree
    assert l1["dp_replicas_identical"] is None and lf["dp_replicas_identical"] is True
    assert lf["tied_embeddings_identical"] is True and lf["wire"]["dp_allreduce"] == 0
    # MaVo at N=2: 2 (N-1)/N / H = 0.5 bit per parameter and inner step (+ bucket padding)
    assert 0.5 <= lf["wire"]["dlion"]["bits_per_param_step"] < 0.53 and lf["wire"]["dlion"]["local_steps"] == 2
    # the DP reduction is really off: after one local step the two DP ranks' weights (side files) differ
    mid = pp2_dp2 / "ckpt_local" / "iter_0000001" / "rank_state"
    for pp in (0, 1):
        w0, w1 = (torch.load(mid / f"mp_rank_00_{pp:03d}_dp{dp:03d}.pt", weights_only=False)["local"]["model"][0]
                  for dp in (0, 1))
        assert any(torch.is_tensor(v) and not torch.equal(v, w1[k]) for k, v in w0.items()), pp
    assert_same(contents(pp2_dp2 / "ckpt_local_full" / "iter_0000004", tmp_path / "e.pt"),
                contents(pp2_dp2 / "ckpt_local" / "iter_0000004", tmp_path / "f.pt"), "local steps iteration 4",
                skip=("_extra_state",))

    af, a1, a2 = (_summary(pp2_dp2 / n) for n in ("adam_full", "adam_part1", "adam_part2"))
    assert af["losses"] == a1["losses"] + a2["losses"], (af, a1, a2)
    assert_same(contents(pp2_dp2 / "ckpt_adam_full" / "iter_0000003", tmp_path / "c.pt"),
                contents(pp2_dp2 / "ckpt_adam" / "iter_0000003", tmp_path / "d.pt"), "adam iteration 3",
                skip=("_extra_state",))


# ----------------------------------------------------------------------------------------------- launch scripts


@pytest.mark.slow
def _launch(script: str, env: dict, args: list[str], out: pathlib.Path, timeout: int) -> dict:
    """Run ``launch/<script>`` as a user would; assert it succeeded and return its summary."""
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(REPO / "launch" / script), *args, "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    logger.info("launch/%s: %.1f s", script, time.perf_counter() - t0)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return _summary(out)


def test_megatron_gpt_launch(tiny_data, tmp_path):
    """2 processes, 3 iterations."""
    args = [*BASE, "--pipeline-model-parallel-size", "2", "--global-batch-size", "4", "--optimizer", "adam",
            "--untie-embeddings-and-output-weights", "--train-iters", "3", "--data-path", tiny_data]
    s = _launch("megatron_gpt.sh", _script_env() | {"NPROC": "2"}, args, tmp_path, timeout=300)
    _check_common(s, 1, 2, 1, 3)
    assert s["tied_embeddings_identical"] is None and s["wire"]["embedding_allreduce"] == 0  # untied


@pytest.mark.slow
def test_3d_launch(tiny_data, tmp_path):
    """tp=2 x pp=2 x dp=2 (8 processes on CPU), STEPS=2: measured ~40 s on 2 busy cores, mostly imports."""
    s = _launch("3d_gpt.sh", _script_env() | {"STEPS": "2"}, ["--data-path", tiny_data], tmp_path, timeout=400)
    _check_common(s, 2, 2, 2, 2)
    assert s["tied_embeddings_identical"] is True
    assert s["optimizer"] == "distlion" and s["p2p_compression"].endswith(".json")
    w = s["wire"]
    assert w["dlion"]["bytes_sent"] > 0 and 1.0 <= w["dlion"]["bits_per_param_step"] < 1.05
    for channel in ("p2p_activations", "p2p_gradients"):
        assert w[channel]["bytes_sent"] > 0 and w[channel]["bytes_per_element"] < 1.1, w[channel]


# ----------------------------------------------------------------------------------------------- arguments


def _args(*extra: str):
    from distlion_ds.megatron.pretrain_gpt import parse_args

    return parse_args(["--train-iters", "2", *extra])


@pytest.mark.parametrize("extra, world, message", [
    (["--global-batch-size", "6", "--micro-batch-size", "2"], 2, "not divisible by --micro-batch-size 2 x data"),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6, "world size 6"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], 2, "--num-layers 3"),
    (["--tensor-model-parallel-size", "3", "--num-attention-heads", "4", "--hidden-size", "12"], 3, "heads 4"),
    (["--p2p-compression", str(CONFIGS / "topk10_q8.json")], 2, "pipeline-model-parallel-size >= 2"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "3", "--micro-batch-size", "1"], 2, "multiple of --pipeline-model-parallel-size"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "3"],
     2, "does not divide"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "needs --pipeline-model-parallel-size >= 2"),
    (["--epoch-samples", "10", "--global-batch-size", "4"], 2, "--epoch-samples 10"),
    (["--exit-interval", "5"], 1, "exceeds --train-iters"),
    # the Megatron-LM plugin's combination checks
    (["--optimizer", "adam", "--dlion-local-steps", "4"], 1, "--dlion-local-steps 4 has no effect without --distlion"),
    (["--distlion", "--pipeline-model-parallel-size", "2", "--untie-embeddings-and-output-weights",
      "--tied-embedding-compression", '{"method": "quantize", "bits": 8}'], 2, "there is no tied embedding"),
    (["--distlion", "--tied-embedding-compression", '{"method": "quantize", "bits": 8}'], 1,
     "--tied-embedding-compression needs --pipeline-model-parallel-size >= 2"),
])
def test_invalid_combinations(extra, world, message):
    from distlion_ds.megatron.pretrain_gpt import validate_args

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate_args(_args(*extra), world)


@pytest.mark.parametrize("extra, message", [
    (["--micro-batch-size", "0"], "--micro-batch-size must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--hidden-size", "30", "--num-attention-heads", "4"], "not divisible by --num-attention-heads"),
    (["--save-interval", "1"], "--save-interval needs --save"),
    (["--lr-warmup-iters", "2"], "--lr-warmup-iters 2 must be below"),
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr 1.0 exceeds"),
    (["--optimizer", "sgd"], "invalid choice"),
    (["--p2p-compression", "no/such.json"], "argument --p2p-compression: --p2p-compression: 'no/such.json' is neither"),
    (["--p2p-compression", '{"activations": {"method": "topk", "ratio": true}}'],
     "--p2p-compression.activations.ratio: Input should be a valid number (got True)"),
    (["--ckpt-format", "torch"], "argument --ckpt-format: invalid choice: 'torch'"),
    (["--dlion-beta1", "1.0"], "--dlion-beta1 must be in [0, 1)"),
    (["--dlion-local-steps", "0"], "--dlion-local-steps takes an integer >= 1"),
])
def test_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit):
        _args(*extra)
    assert message in capsys.readouterr().err


def test_valid_layouts():
    from distlion_ds.megatron.pretrain_gpt import validate_args

    lay = validate_args(_args("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                              "--num-layers", "4", "--micro-batch-size", "2", "--global-batch-size", "8"), 8)
    assert (lay.tp, lay.pp, lay.dp, lay.vp, lay.num_micro, lay.global_batch) == (2, 2, 2, 1, 2, 8)
    lay = validate_args(_args("--pipeline-model-parallel-size", "2", "--num-layers", "8",
                              "--num-layers-per-virtual-pipeline-stage", "2", "--global-batch-size", "4"), 4)
    assert (lay.dp, lay.vp, lay.num_micro) == (2, 2, 2)
    assert validate_args(_args("--micro-batch-size", "3"), 2).global_batch == 6  # default: micro x dp
    # --optimizer distlion is this entry's spelling of Megatron-LM's --optimizer adam --distlion
    assert _args("--optimizer", "distlion").distlion and _args("--distlion").distlion
    assert _args().distlion and not _args("--optimizer", "adam").distlion  # the entry's default is D-Lion
    assert _args("--aggregation", "avg").dlion_aggregation == "avg" and _args().dlion_aggregation == "mavo"


def test_distributed_timeout(monkeypatch, capsys):
    """--distributed-timeout-minutes (default 10) reaches init_process_group as a timedelta; bad values refused."""
    import datetime

    from distlion_ds.megatron import pretrain_gpt

    assert _args().distributed_timeout_minutes == 10.0
    calls = []
    monkeypatch.setattr(pretrain_gpt.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(pretrain_gpt.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(pretrain_gpt.torch.cuda, "is_available", lambda: False)
    assert pretrain_gpt._init_distributed(_args("--distributed-timeout-minutes", "0.5").distributed_timeout_minutes)
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(seconds=30)})]
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            _args("--distributed-timeout-minutes", bad)
        assert "--distributed-timeout-minutes must be a finite number > 0" in capsys.readouterr().err


def test_cpu_clip_and_pinned_private_signatures():
    """The CPU clip (opt-in, idempotent) scales by megatron-core's coefficient exactly; the private megatron-core
    callables the entry rebinds keep the signatures it replaces them with (core_v0.16.1)."""
    import inspect

    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mco

    from distlion_ds.megatron.training import optimizer as topt

    assert list(inspect.signature(clip_grads.clip_grad_by_total_norm_fp32).parameters) == [
        "parameters", "max_norm", "total_norm", "use_decoupled_grad"]
    for name in ("start_grad_sync", "finish_grad_sync"):
        assert list(inspect.signature(getattr(_ParamAndGradBucketGroup, name)).parameters) == [
            "self", "force_all_reduce"], name
    original = mco.clip_grad_by_total_norm_fp32
    try:
        topt.enable_cpu_clip()
        patched = mco.clip_grad_by_total_norm_fp32
        topt.enable_cpu_clip()
        assert mco.clip_grad_by_total_norm_fp32 is patched is not original  # idempotent
        p = torch.nn.Parameter(torch.zeros(5))
        p.grad = torch.tensor([3.0, -4.0, 0.5, 0.0, 1e-3])
        expected = p.grad * (1.0 / (7.0 + 1.0e-6))
        patched([p], 1.0, 7.0)
        assert torch.equal(p.grad, expected)
        before = p.grad.clone()
        patched([p], 10.0, 7.0)  # coefficient >= 1: untouched
        assert torch.equal(p.grad, before)
    finally:
        mco.clip_grad_by_total_norm_fp32 = original
        delattr(mco, topt._CPU_CLIP_MARK)
