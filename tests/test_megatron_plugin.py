"""The Megatron-LM plugin (distlion_ds.megatron.plugin) called the way Megatron-LM's training loop calls it.

Megatron-LM's ``megatron.training`` is not in the megatron-core wheel, so this file builds a fake of the parts the
plugin touches, with the signatures Megatron-LM has at tag core_v0.16.1 (``MEGATRON_LM_CONTRACT`` below, read from
megatron/training/training.py, arguments.py and global_vars.py at that tag): ``pretrain`` parses the arguments with
``extra_args_provider``, ``setup_model_and_optimizer`` builds DDP chunks from the module-global ``DDP`` and calls the
module-global ``get_megatron_optimizer(config, model, config_overrides=..., use_gloo_process_groups=...,
dump_param_to_param_group_map=...)``, ``train`` sets ``config.finalize_model_grads_func = finalize_model_grads`` and
fetches ``get_forward_backward_func()`` by module-global name, ``train_step`` calls the schedule without a
``p2p_communicator``, then ``optimizer.step()``. The fake's module bodies run in the fake module's namespace, so the
names resolve at call time exactly as in Megatron-LM. If a real ``megatron.training`` is importable (a Megatron-LM
checkout on the path) the recorded signatures are checked against it as well.

Tests: flags parse / refuse (argparse names the flag), combinations refused by ``validate_args``, pinned
signatures (fake contract, megatron-core names wrapped), install idempotent / logged once / uninstall, the dispatch of
``--distlion`` through ``setup_model_and_optimizer`` (world size 1), and a pp=2 run of the fake ``pretrain`` with
``--p2p-compression`` and ``--tied-embedding-compression``: the tied copies stay identical and the bytes per channel
are the payload sizes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
import types

import pytest
import torch
from _dist import spawn

# ----------------------------------------------------------------------------------------------- pinned contract

# Megatron-LM core_v0.16.1 (megatron/training/*.py): name -> parameters as "name=default".
MEGATRON_LM_CONTRACT = {
    "training.pretrain": "train_valid_test_dataset_provider, model_provider, model_type, forward_step_func, "
                         "process_non_loss_data_func=None, extra_args_provider=None, args_defaults={}, "
                         "get_embedding_ranks=None, get_position_embedding_ranks=None, non_loss_data_func=None, "
                         "store=None, inprocess_call_wrapper=None",
    "training.get_model": "model_provider_func, model_type=<ModelType.encoder_or_decoder: 1>, wrap_with_ddp=True, "
                          "config=None, pg_collection=None",
    "training.setup_model_and_optimizer": "model_provider_func, model_type, checkpointing_context=None",
    "training.get_megatron_optimizer_config": "args",
    "training.train_step": "forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config, "
                           "forward_backward_func, iteration=None",
    "training.train": "forward_step_func, model, optimizer, opt_param_scheduler, train_data_iterator, "
                      "valid_data_iterator, process_non_loss_data_func, config, checkpointing_context, "
                      "non_loss_data_func, inference_model=None",
    "arguments.parse_args": "extra_args_provider=None, ignore_unknown_args=False",
    "arguments.validate_args": "args, defaults={}",
    "global_vars.get_args": "",
}
# megatron-core names the plugin wraps (Megatron-LM imports them into megatron.training.training).
MEGATRON_CORE_CONTRACT = {
    "DDP": "config, ddp_config, module, disable_bucketing=False, pg_collection=None",
    "get_megatron_optimizer": "config, model_chunks, config_overrides=None, use_gloo_process_groups=True, "
                              "pg_collection=None, dump_param_to_param_group_map=None",
    "finalize_model_grads": "model, num_tokens=None, pg_collection=None, force_all_reduce=False",
    "get_forward_backward_func": "pp_size=None, vp_size=None",
}


def _params(fn) -> str:
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append("*" + p.name)
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            out.append("**" + p.name)
        else:
            out.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return ", ".join(out)


# ------------------------------------------------------------------------------------------- the Megatron-LM fake

_GLOBAL_VARS_SRC = '''
_GLOBAL_ARGS = None

def get_args():
    assert _GLOBAL_ARGS is not None, "args is not initialized."
    return _GLOBAL_ARGS

def set_args(args):
    global _GLOBAL_ARGS
    _GLOBAL_ARGS = args
'''

_ARGUMENTS_SRC = '''
import argparse
import torch

def add_megatron_arguments(parser):
    # A subset of Megatron-LM's flags, same names, dests and defaults as core_v0.16.1.
    g = parser.add_argument_group(title="network size")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g = parser.add_argument_group(title="regularization")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-08)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g = parser.add_argument_group(title="training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd", "muon", "dist_muon"])
    g.add_argument("--disable-gloo-process-groups", action="store_false", dest="enable_gloo_process_groups")
    g.add_argument("--dump-param-to-param-group-map", type=str, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--seq-length", type=int, default=None)
    g = parser.add_argument_group(title="distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--overlap-grad-reduce", action="store_true", default=False)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    return parser

def parse_args(extra_args_provider=None, ignore_unknown_args=False):
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser = add_megatron_arguments(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args()
    else:
        args = parser.parse_args()
    return args

def validate_args(args, defaults={}):
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float
    return args
'''

_TRAINING_SRC = '''
import dataclasses

from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.optimizer import (
    AdamOptimizerConfig, SGDOptimizerConfig, get_megatron_optimizer, get_standard_config_overrides)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.utils import get_model_config
from megatron.training.arguments import parse_args, validate_args
from megatron.training.global_vars import get_args, set_args

LAST = {}  # what the test inspects afterwards (the real pretrain returns nothing)

def get_model(model_provider_func, model_type=ModelType.encoder_or_decoder, wrap_with_ddp=True, config=None,
              pg_collection=None):
    args = get_args()
    model = [model_provider_func(pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage())]
    if wrap_with_ddp:
        DP = DDP  # the module global, looked up at call time (Megatron-LM picks FSDP classes here too)
        config = get_model_config(model[0])
        kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistributedDataParallelConfig)
                  if hasattr(args, f.name)}
        kwargs["grad_reduce_in_fp32"] = True
        ddp_config = DistributedDataParallelConfig(**kwargs)
        if not ddp_config.overlap_grad_reduce:
            ddp_config.bucket_size = None
        model = [DP(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0))
                 for i, chunk in enumerate(model)]
    return model

def get_megatron_optimizer_config(args):
    if args.optimizer == "adam" or "muon" in args.optimizer:
        cls = AdamOptimizerConfig
    elif args.optimizer == "sgd":
        cls = SGDOptimizerConfig
    else:
        raise ValueError("Invalid optimizer type!")
    config = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    return config, get_standard_config_overrides(config=config)

def setup_model_and_optimizer(model_provider_func, model_type, checkpointing_context=None):
    args = get_args()
    model = get_model(model_provider_func, model_type, wrap_with_ddp=True)
    config, config_overrides = get_megatron_optimizer_config(args)
    if "muon" in config.optimizer:
        raise NotImplementedError("the fake does not model muon")
    optimizer = get_megatron_optimizer(
        config,
        model,
        config_overrides=config_overrides,
        use_gloo_process_groups=args.enable_gloo_process_groups,
        dump_param_to_param_group_map=args.dump_param_to_param_group_map,
    )
    return model, optimizer, None

def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
               forward_backward_func, iteration=None):
    args = get_args()
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward_func(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=args.global_batch_size // (args.micro_batch_size * mpu.get_data_parallel_world_size()),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        decoder_seq_length=None,
        forward_only=False,
        adjust_tensor_shapes_fn=None,
        force_all_reduce=False,
    )
    update_successful, grad_norm, num_zeros = optimizer.step()
    return losses, update_successful

def train(forward_step_func, model, optimizer, opt_param_scheduler, train_data_iterator, valid_data_iterator,
          process_non_loss_data_func, config, checkpointing_context, non_loss_data_func, inference_model=None):
    args = get_args()
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    forward_backward_func = get_forward_backward_func()
    LAST["losses"] = []
    for iteration in range(args.train_iters):
        losses, ok = train_step(forward_step_func, train_data_iterator, model, optimizer, opt_param_scheduler,
                                config, forward_backward_func, iteration=iteration)
        LAST["losses"].append((losses, ok))
    return args.train_iters

def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
             process_non_loss_data_func=None, extra_args_provider=None, args_defaults={}, get_embedding_ranks=None,
             get_position_embedding_ranks=None, non_loss_data_func=None, store=None, inprocess_call_wrapper=None):
    args = parse_args(extra_args_provider)
    validate_args(args, args_defaults)
    set_args(args)
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                  pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    model_parallel_cuda_manual_seed(args.seed)
    model, optimizer, opt_param_scheduler = setup_model_and_optimizer(model_provider, model_type)
    config = get_model_config(model[0])
    train_it, _, _ = train_valid_test_dataset_provider(None)
    train(forward_step_func, model, optimizer, opt_param_scheduler, train_it, None, process_non_loss_data_func,
          config, None, non_loss_data_func)
    LAST.update(model=model, optimizer=optimizer, args=args)
'''


def install_fake_megatron_lm() -> types.ModuleType:
    """Put the fake ``megatron.training`` (package, global_vars, arguments, training) into ``sys.modules``."""
    import megatron

    pkg = types.ModuleType("megatron.training")
    pkg.__path__ = []  # a package: its submodules are the entries below
    sys.modules["megatron.training"] = pkg
    megatron.training = pkg
    for name, src in (("global_vars", _GLOBAL_VARS_SRC), ("arguments", _ARGUMENTS_SRC), ("training", _TRAINING_SRC)):
        mod = types.ModuleType(f"megatron.training.{name}")
        sys.modules[mod.__name__] = mod
        setattr(pkg, name, mod)
        exec(compile(src, f"<fake megatron/training/{name}.py>", "exec"), mod.__dict__)
    pkg.get_args = pkg.global_vars.get_args
    return pkg.training


def remove_fake_megatron_lm() -> None:
    import megatron

    for name in ("megatron.training.training", "megatron.training.arguments", "megatron.training.global_vars",
                 "megatron.training"):
        sys.modules.pop(name, None)
    if hasattr(megatron, "training"):
        del megatron.training


@pytest.fixture
def fake_lm():
    from distlion_ds.megatron import plugin

    if "megatron.training" in sys.modules:  # a real Megatron-LM on the path: do not shadow it
        pytest.skip("a real megatron.training is imported; the fake would shadow it")
    training = install_fake_megatron_lm()
    try:
        yield training
    finally:
        plugin.uninstall_megatron_lm()
        remove_fake_megatron_lm()


# ---------------------------------------------------------------------------------------------------- flags


def _parser() -> argparse.ArgumentParser:
    from distlion_ds.megatron import plugin

    return plugin.add_arguments(argparse.ArgumentParser(allow_abbrev=False))


def test_flags_parse(tmp_path):
    f = tmp_path / "p2p.json"
    f.write_text(json.dumps({"activations": {"method": "topk", "ratio": 0.1}}))
    a = _parser().parse_args([])
    assert (a.distlion, a.dlion_aggregation, a.dlion_beta1, a.dlion_beta2, a.dlion_local_steps,
            a.p2p_compression, a.tied_embedding_compression) == (False, "mavo", 0.9, 0.99, 1, None, None)
    tied = '{"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"}'
    a = _parser().parse_args(["--distlion", "--dlion-aggregation", "avg", "--dlion-beta1", "0.95", "--dlion-beta2",
                              "0.98", "--dlion-local-steps", "8", "--p2p-compression", str(f),
                              "--tied-embedding-compression", tied])
    assert (a.distlion, a.dlion_aggregation, a.dlion_beta1, a.dlion_beta2, a.dlion_local_steps) == (
        True, "avg", 0.95, 0.98, 8)
    assert a.p2p_compression == str(f) and a.tied_embedding_compression == tied  # kept as given (plain strings)


@pytest.mark.parametrize("argv, message", [
    (["--dlion-aggregation", "median"], r"argument --dlion-aggregation: invalid choice: 'median'"),
    (["--dlion-beta1", "1.0"], r"argument --dlion-beta1: '1.0' is out of range; --dlion-beta1 must be in \[0, 1\)"),
    (["--dlion-beta2", "abc"], r"argument --dlion-beta2: 'abc' is not a number"),
    (["--dlion-beta2", "nan"], r"argument --dlion-beta2: 'nan' is out of range"),
    (["--dlion-local-steps", "0"], r"argument --dlion-local-steps: 0 is out of range; --dlion-local-steps takes"),
    (["--dlion-local-steps", "1.5"], r"argument --dlion-local-steps: '1.5' is not an integer"),
    (["--p2p-compression", "no/such.json"], r"argument --p2p-compression: --p2p-compression: 'no/such.json' is "
                                            r"neither a JSON document nor an existing file"),
    (["--p2p-compression", '{"activations": {"method": "topk", "ratio": 2}}'],
     r"argument --p2p-compression: .*--p2p-compression\.activations\.ratio"),
    (["--tied-embedding-compression", '{"method": "quantize", "feedback": "ef21"}'],
     r"argument --tied-embedding-compression: --tied-embedding-compression\.feedback: 'ef21'"),
    (["--tied-embedding-compression", '{"method": "quantize", "bits": 3}'],
     r"argument --tied-embedding-compression: .*--tied-embedding-compression\.bits"),
])
def test_flags_refused_naming_the_flag(argv, message, capsys):
    import re

    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_flags_join_megatron_lm_parser_without_conflict(fake_lm, monkeypatch, capsys):
    from distlion_ds.megatron import plugin

    arguments = sys.modules["megatron.training.arguments"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", "--lr", "1e-3", "--distlion", "--dlion-aggregation", "avg"])
    a = arguments.parse_args(plugin.add_arguments)
    assert (a.optimizer, a.distlion, a.dlion_aggregation, a.lr) == ("adam", True, "avg", 1e-3)
    # Megatron-LM's own --optimizer has fixed choices: why D-Lion is a separate switch.
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", "--optimizer", "distlion"])
    with pytest.raises(SystemExit):
        arguments.parse_args(plugin.add_arguments)
    assert "argument --optimizer: invalid choice: 'distlion'" in capsys.readouterr().err


def _ns(**kw) -> argparse.Namespace:
    base = dict(optimizer="adam", use_distributed_optimizer=False, pipeline_model_parallel_size=2,
                untie_embeddings_and_output_weights=False, distlion=False, dlion_aggregation="mavo", dlion_beta1=0.9,
                dlion_beta2=0.99, dlion_local_steps=1, p2p_compression=None, tied_embedding_compression=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw, message", [
    (dict(distlion=True, optimizer="sgd"), r"--distlion needs --optimizer adam .*got --optimizer sgd"),
    (dict(distlion=True, optimizer="muon"), r"got --optimizer muon"),
    (dict(distlion=True, use_distributed_optimizer=True), r"--distlion with --use-distributed-optimizer"),
    (dict(dlion_aggregation="avg"), r"--dlion-aggregation avg has no effect without --distlion"),
    (dict(dlion_local_steps=4), r"--dlion-local-steps 4 has no effect without --distlion"),
    (dict(dlion_beta2=0.95), r"--dlion-beta2 0.95 has no effect without --distlion"),
    (dict(p2p_compression="{}", pipeline_model_parallel_size=1), r"--p2p-compression needs pipeline parallelism"),
    (dict(tied_embedding_compression="{}", untie_embeddings_and_output_weights=True),
     r"--tied-embedding-compression with --untie-embeddings-and-output-weights"),
    (dict(tied_embedding_compression="{}", pipeline_model_parallel_size=1),
     r"--tied-embedding-compression needs --pipeline-model-parallel-size >= 2"),
])
def test_validate_args_refuses_combinations(kw, message):
    from distlion_ds.megatron.plugin import validate_args

    with pytest.raises(ValueError, match=message):
        validate_args(_ns(**kw))


def test_validate_args_accepts_and_lists_every_problem():
    from distlion_ds.megatron.plugin import validate_args

    validate_args(_ns())
    validate_args(_ns(distlion=True, dlion_aggregation="avg", dlion_local_steps=4, p2p_compression="{}",
                      tied_embedding_compression="{}"))
    with pytest.raises(ValueError) as exc:
        validate_args(_ns(distlion=True, optimizer="sgd", use_distributed_optimizer=True))
    assert "--optimizer adam" in str(exc.value) and "--use-distributed-optimizer" in str(exc.value)


# ---------------------------------------------------------------------------------------- pinned signatures


def test_pinned_signatures(fake_lm):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from distlion_ds.megatron import plugin

    for dotted, want in MEGATRON_LM_CONTRACT.items():
        mod, name = dotted.split(".")
        assert _params(getattr(sys.modules[f"megatron.training.{mod}"], name)) == want, dotted
    # the names the plugin rebinds are megatron-core's, imported into megatron.training.training
    from megatron.core.distributed import DistributedDataParallel

    assert fake_lm.DDP is DistributedDataParallel
    assert fake_lm.get_megatron_optimizer is get_megatron_optimizer
    assert fake_lm.finalize_model_grads is finalize_model_grads
    assert fake_lm.get_forward_backward_func is get_forward_backward_func
    for name, want in MEGATRON_CORE_CONTRACT.items():
        assert _params(getattr(fake_lm, name)) == want, name
    # the wrappers accept what the loop passes: same parameters for finalize_model_grads; get_megatron_optimizer
    # takes (config, model_chunks) positionally and the rest by keyword
    plugin.install_megatron_lm()
    assert _params(fake_lm.finalize_model_grads) == MEGATRON_CORE_CONTRACT["finalize_model_grads"]
    assert _params(fake_lm.get_megatron_optimizer) == "config, model_chunks, *args, **kwargs"
    assert _params(fake_lm.get_forward_backward_func) == "*args, **kwargs"
    assert _params(fake_lm.DDP) == "config, ddp_config, module, *args, **kwargs"
    assert issubclass(fake_lm.DDP, DistributedDataParallel)  # train()'s isinstance(model[0], DDP) still holds


def test_real_megatron_lm_matches_contract_when_present():
    import importlib.util

    if "megatron.training" in sys.modules or importlib.util.find_spec("megatron.training") is None:
        pytest.skip("Megatron-LM's megatron.training is not installed (megatron-core wheel only)")
    for dotted, want in MEGATRON_LM_CONTRACT.items():
        mod, name = dotted.split(".")
        real = importlib.import_module(f"megatron.training.{mod}")
        assert _params(getattr(real, name)).replace("ModelType.encoder_or_decoder", "") == \
            want.replace("<ModelType.encoder_or_decoder: 1>", ""), dotted


# ------------------------------------------------------------------------------------------ install / uninstall


def test_install_idempotent_logged_once_and_uninstall(fake_lm, caplog):
    from distlion_ds.megatron import plugin

    originals = {n: getattr(fake_lm, n) for n in ("DDP", "get_megatron_optimizer", "finalize_model_grads",
                                                   "get_forward_backward_func")}
    assert not plugin.is_megatron_lm_installed()
    with caplog.at_level(logging.INFO, logger="distlion_ds.megatron.plugin"):
        assert plugin.install_megatron_lm() is True
        wrapped = {n: getattr(fake_lm, n) for n in originals}
        assert plugin.install_megatron_lm() is False
        assert plugin.install_megatron_lm() is False
    assert sum("plugin installed" in r.getMessage() for r in caplog.records) == 1
    assert plugin.is_megatron_lm_installed()
    for n, fn in originals.items():
        assert wrapped[n] is not fn and getattr(fake_lm, n) is wrapped[n]  # not wrapped twice
        assert wrapped[n].original is fn
    plugin.uninstall_megatron_lm()
    assert not plugin.is_megatron_lm_installed()
    for n, fn in originals.items():
        assert getattr(fake_lm, n) is fn
    plugin.uninstall_megatron_lm()  # no-op


def test_install_without_megatron_lm_says_what_to_do():
    from distlion_ds.megatron import plugin

    if "megatron.training" in sys.modules:
        pytest.skip("megatron.training is importable here")
    with pytest.raises(ImportError, match="Megatron-LM's megatron.training, which is not importable"):
        plugin.install_megatron_lm()
    assert plugin.is_megatron_lm_installed() is False


def test_install_refuses_a_megatron_lm_without_the_names(fake_lm):
    from distlion_ds.megatron import plugin

    del fake_lm.get_forward_backward_func
    with pytest.raises(RuntimeError, match="has no get_forward_backward_func"):
        plugin.install_megatron_lm()


# ------------------------------------------------------------------------------------------------ the loop runs

SEQ, MBS, VOCAB, HIDDEN = 16, 2, 96, 32


def _model_provider(pre_process=True, post_process=True):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training import get_args

    args = get_args()
    pp = ps.get_pipeline_model_parallel_world_size()
    cfg = TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                            num_attention_heads=args.num_attention_heads, use_cpu_initialization=True,
                            pipeline_dtype=torch.float32, pipeline_model_parallel_size=pp,
                            hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                    pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)


def _datasets_provider(_):
    def batches():
        g = torch.Generator().manual_seed(7)
        while True:
            tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
            yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                   "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}

    return batches(), None, None


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"lm loss": loss.detach()}

    return out, loss_func


def _argv(*extra: str) -> list[str]:
    return ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", str(HIDDEN), "--num-attention-heads", "4",
            "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size", str(2 * MBS),
            "--lr", "1e-3", "--clip-grad", "0", "--train-iters", "3", *extra]


def _pretrain(training, argv: list[str]):
    from megatron.core.enums import ModelType

    from distlion_ds.megatron import plugin

    sys.argv = argv
    training.pretrain(_datasets_provider, _model_provider, ModelType.encoder_or_decoder, _forward_step,
                      extra_args_provider=plugin.add_arguments)
    return training.LAST


def _dispatch_worker(rank: int, world: int) -> None:
    """World size 1: --distlion reaches distlion_ds.megatron.get_optimizer with Megatron-LM's config; without it
    megatron-core's own optimizer is built."""
    torch.set_num_threads(1)
    import dataclasses

    from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer

    from distlion_ds.megatron import enable_cpu, plugin

    enable_cpu()
    training = install_fake_megatron_lm()
    assert plugin.install_megatron_lm()

    # no flag: megatron-core's optimizer, through the wrapper
    last = _pretrain(training, _argv())
    assert type(last["optimizer"]).__module__.startswith("megatron.core.optimizer")
    assert all(ok for _, ok in last["losses"])

    # --distlion: a recording stand-in for distlion_ds.megatron.optimizer.get_optimizer (checks the mapping of the
    # flags onto OptimizerConfig and the keyword arguments), returning megatron-core's optimizer so the loop runs
    calls = []

    def recording_get_optimizer(config, model_chunks, *, aggregation="mavo", config_overrides=None, **kwargs):
        calls.append((config, model_chunks, aggregation, config_overrides, kwargs))
        return get_megatron_optimizer(dataclasses.replace(config, adam_beta1=0.9, adam_beta2=0.999), model_chunks)

    real_module = sys.modules.get("distlion_ds.megatron.optimizer")
    ddp_calls = []

    def recording_ddp_config_for_dlion(**overrides):
        from megatron.core.distributed import DistributedDataParallelConfig

        ddp_calls.append(overrides)
        return DistributedDataParallelConfig(**overrides)  # unchanged: megatron's Adam runs on it below

    stand_in = types.ModuleType("distlion_ds.megatron.optimizer")
    stand_in.get_optimizer = recording_get_optimizer
    stand_in.ddp_config_for_dlion = recording_ddp_config_for_dlion
    sys.modules["distlion_ds.megatron.optimizer"] = stand_in
    import distlion_ds.megatron as dlm

    had_attr = hasattr(dlm, "optimizer")
    saved_attr = getattr(dlm, "optimizer", None)
    dlm.optimizer = stand_in
    try:
        last = _pretrain(training, _argv("--distlion", "--dlion-aggregation", "avg", "--dlion-beta1", "0.95",
                                         "--dlion-beta2", "0.98", "--weight-decay", "0.1"))
    finally:
        if real_module is not None:
            sys.modules["distlion_ds.megatron.optimizer"] = real_module
        else:
            del sys.modules["distlion_ds.megatron.optimizer"]
        if had_attr:
            dlm.optimizer = saved_attr
        else:
            del dlm.optimizer
    assert len(calls) == 1
    config, chunks, aggregation, overrides, kwargs = calls[0]
    assert aggregation == "avg"
    assert (config.optimizer, config.lr, config.weight_decay, config.clip_grad) == ("adam", 1e-3, 0.1, 0.0)
    assert (config.adam_beta1, config.adam_beta2) == (0.95, 0.98)  # Lion's betas, not --adam-beta1/2
    assert overrides is not None and kwargs == {}  # config_overrides forwarded (named); no local_steps at H = 1
    assert chunks is last["model"]
    # get_model's DDP got D-Lion's DDP config from Megatron-LM's, every field but the two D-Lion sets kept
    assert len(ddp_calls) == 1
    assert "use_distributed_optimizer" not in ddp_calls[0] and "overlap_param_gather" not in ddp_calls[0]
    assert ddp_calls[0]["grad_reduce_in_fp32"] is True and ddp_calls[0]["bucket_size"] is None

    # --dlion-local-steps > 1 with an optimizer factory that has no local_steps: refused naming the flag
    sys.modules["distlion_ds.megatron.optimizer"] = stand_in
    try:
        _pretrain(training, _argv("--distlion", "--dlion-local-steps", "4"))
    except ValueError as e:
        assert "--dlion-local-steps 4" in str(e), e
    else:
        raise AssertionError("--dlion-local-steps 4 was not refused")
    finally:
        if real_module is not None:
            sys.modules["distlion_ds.megatron.optimizer"] = real_module
        else:
            del sys.modules["distlion_ds.megatron.optimizer"]

    # the real D-Lion optimizer, when this checkout has it (issue 11 item 1, distlion_ds/megatron/optimizer.py)
    try:
        from distlion_ds.megatron.optimizer import DistributedLionOptimizer
    except ImportError:
        DistributedLionOptimizer = None
    if DistributedLionOptimizer is not None:
        last = _pretrain(training, _argv("--distlion"))
        assert isinstance(last["optimizer"], DistributedLionOptimizer)
        assert isinstance(last["optimizer"], MegatronOptimizer)
        assert all(c.ddp_config.use_distributed_optimizer and not c.ddp_config.overlap_param_gather
                   for c in last["model"])
        assert all(ok for _, ok in last["losses"])
    plugin.uninstall_megatron_lm()


def test_distlion_dispatch_through_setup_model_and_optimizer():
    spawn(_dispatch_worker, 1)


def _checkpoint_round_trip(last: dict, ckpt_dir: str) -> None:
    """Save model + optimizer as Megatron-LM's torch_dist path does, zero the tied EF state, load: it is back."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from distlion_ds.megatron import plugin
    from distlion_ds.megatron.tied import SHARDED_KEY, TiedEmbeddingState

    model, optimizer = last["model"], last["optimizer"]
    state = plugin.tied_embedding_state()
    before = {k: v.clone() for k, v in state.residuals.items()}, dict(state.transfers)
    model_sd = model[0].sharded_state_dict()
    opt_sd = optimizer.sharded_state_dict(model_sd)
    assert isinstance(opt_sd[SHARDED_KEY], ShardedObject)
    dist_checkpointing.save({"model": model_sd, "optimizer": opt_sd}, ckpt_dir)
    state.load_state_dict(TiedEmbeddingState().state_dict())  # forget it
    assert state.residuals == {}
    model_sd = model[0].sharded_state_dict()
    loaded = dist_checkpointing.load({"model": model_sd, "optimizer": optimizer.sharded_state_dict(
        model_sd, is_loading=True)}, ckpt_dir)
    optimizer.load_state_dict(loaded["optimizer"])
    assert state.transfers == before[1]
    assert state.residuals.keys() == before[0].keys()
    assert all(torch.equal(state.residuals[k], v) for k, v in before[0].items())


def _pp2_worker(rank: int, world: int, p2p_path: str, ckpt_dir: str) -> None:
    """pp=2 through the fake pretrain with --p2p-compression and --tied-embedding-compression: with megatron-core's
    Adam, then with --distlion (when this checkout has distlion_ds.megatron.optimizer)."""
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import schedules

    from distlion_ds.megatron import CompressedP2PCommunicator, enable_cpu, plugin

    try:
        from distlion_ds.megatron.optimizer import DistributedLionOptimizer
    except ImportError:
        DistributedLionOptimizer = None
    enable_cpu()
    training = install_fake_megatron_lm()
    tied = '{"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"}'
    iters = 3
    variants = [()] + ([("--distlion",)] if DistributedLionOptimizer is not None else [])
    for extra in variants:
        assert plugin.install_megatron_lm()
        last = _pretrain(training, _argv("--pipeline-model-parallel-size", "2", "--p2p-compression", p2p_path,
                                         "--tied-embedding-compression", tied, *extra))
        assert len(last["losses"]) == iters and all(ok for _, ok in last["losses"]), extra
        if extra:
            assert isinstance(last["optimizer"], DistributedLionOptimizer)
        if ps.is_pipeline_last_stage():
            assert all(math.isfinite(float(r["lm loss"])) for losses, _ in last["losses"] for r in losses)
        # the schedules built our communicator (Megatron-LM's train_step passes none)
        assert issubclass(schedules.P2PCommunicator, CompressedP2PCommunicator)
        stats = plugin.plugin_comm_stats()
        sent = "activations" if ps.is_pipeline_first_stage() else "gradients"
        assert stats["p2p"][sent]["bytes_sent"] > 0
        assert stats["p2p"][sent]["bytes_sent"] < 4 * stats["p2p"][sent]["elements_sent"]  # below fp32
        # the tied channel: one payload per iteration each way, 8-bit codes + one fp32 scale per 256 elements
        numel = VOCAB * HIDDEN
        payload = numel + 4 * math.ceil(numel / 256)
        te = stats["tied_embedding"]["word_embeddings"]
        assert te == {"bytes_sent": iters * payload, "bytes_received": iters * payload,
                      "elements_sent": iters * numel, "transfers": iters,
                      "fp32_allreduce_bytes": iters * numel * 4}, (extra, te)
        assert plugin.tied_embedding_state().residuals["word_embeddings"].abs().max() > 0
        # the two copies of the tied embedding are identical after training on the compressed sum
        weight = last["model"][0].module.shared_embedding_or_output_weight().detach()
        copies = [torch.empty_like(weight) for _ in range(2)]
        torch.distributed.all_gather(copies, weight.contiguous(), group=ps.get_embedding_group())
        assert torch.equal(copies[0], copies[1]), extra
        # Megatron-LM's torch_dist checkpoint carries the EF state through the optimizer's sharded_state_dict
        _checkpoint_round_trip(last, f"{ckpt_dir}/{len(extra)}")
        plugin.uninstall_megatron_lm()
        assert not issubclass(schedules.P2PCommunicator, CompressedP2PCommunicator)
        assert plugin.tied_embedding_state().residuals == {}  # dropped with the installation
    ps.destroy_model_parallel()


def test_plugin_pp2_compressed_p2p_and_tied_embeddings(tmp_path):
    p2p = tmp_path / "p2p.json"
    p2p.write_text(json.dumps({"activations": {"method": "quantize", "bits": 8, "block_size": 256},
                               "gradients": {"method": "quantize", "bits": 8, "block_size": 256}}))
    for variant in ("0", "1"):  # one checkpoint folder per variant (Adam, D-Lion)
        (tmp_path / "ckpt" / variant).mkdir(parents=True)
    spawn(_pp2_worker, 2, str(p2p), str(tmp_path / "ckpt"))
