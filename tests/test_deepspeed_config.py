"""The DeepSpeed seam without processes: config parsing, refusals before any training, pass-through, pins."""

import inspect
import json
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distlion_ds.deepspeed.config import (
    DEEPSPEED_GRADIENT_CLIPPING_DEFAULT,
    DistributedLionParams,
    parse_deepspeed_config,
)

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def _dlion(params=None, **top):
    section = {"type": "DistributedLion"}
    if params is not None:
        section["params"] = params
    return {"train_micro_batch_size_per_gpu": 2, "optimizer": section, **top}


@pytest.mark.parametrize("type_name", ["DistributedLion", "distributedlion", "DISTRIBUTEDLION", "distributedLion"])
def test_type_is_case_insensitive_and_section_is_removed(type_name):
    cfg = _dlion({"lr": 3e-4, "betas": [0.95, 0.98], "weight_decay": 0.1, "aggregation": "avg"})
    cfg["optimizer"]["type"] = type_name
    plan = parse_deepspeed_config(cfg)
    assert plan is not None
    assert plan.optimizer == DistributedLionParams(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1, aggregation="avg")
    assert "optimizer" not in plan.deepspeed_config
    assert plan.deepspeed_config["gradient_clipping"] == 0.0  # DeepSpeed's DP-averaged norm is switched off
    assert plan.gradient_clipping == DEEPSPEED_GRADIENT_CLIPPING_DEFAULT  # ...and applied locally instead
    assert cfg["optimizer"]["type"] == type_name  # the caller's dict is not modified


def test_defaults_and_explicit_clipping():
    plan = parse_deepspeed_config(_dlion(gradient_clipping=0.25))
    assert plan.optimizer == DistributedLionParams()
    assert plan.optimizer.aggregation == "mavo" and plan.optimizer.lr == 1e-4 and plan.optimizer.betas == (0.9, 0.99)
    assert plan.gradient_clipping == 0.25
    assert parse_deepspeed_config(_dlion(gradient_clipping=0)).gradient_clipping == 0.0


@pytest.mark.parametrize(
    "cfg",
    [
        {"train_micro_batch_size_per_gpu": 2},
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "anything": 1}}},
        {"optimizer": {"type": "Lion", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": 3}},
    ],
)
def test_other_configs_are_not_ours(cfg):
    assert parse_deepspeed_config(cfg) is None


@pytest.mark.parametrize(
    "cfg, needles",
    [
        (_dlion({"lr": 1e-3, "eps": 1e-8}), ["optimizer.params.eps", "unknown key", "lr", "aggregation"]),
        (_dlion({"aggregation": "sum"}), ["optimizer.params.aggregation", "'mavo'", "'avg'", "'sum'"]),
        (_dlion({"lr": 0.0}), ["optimizer.params.lr", "greater than 0"]),
        (_dlion({"lr": "fast"}), ["optimizer.params.lr"]),
        (_dlion({"betas": [0.9, 1.0]}), ["optimizer.params.betas", "beta2", "[0, 1)"]),
        (_dlion({"betas": [0.9]}), ["optimizer.params.betas"]),
        (_dlion({"weight_decay": -0.1}), ["optimizer.params.weight_decay", "greater than or equal to 0"]),
        (_dlion({"check_replicas_every": -1}), ["optimizer.params.check_replicas_every"]),
        (_dlion({"check_replicas_every": 1.5}), ["optimizer.params.check_replicas_every"]),
        (_dlion({"bucket_numel": 4}), ["optimizer.params.bucket_numel"]),
        (_dlion({"raise_on_nonfinite": "maybe"}), ["optimizer.params.raise_on_nonfinite"]),
        (_dlion({"max_grad_norm": 1.0}), ["optimizer.params.max_grad_norm", "unknown key"]),
        ({"optimizer": {"type": "DistributedLion", "parms": {}}}, ["optimizer.parms", "allowed keys: params, type"]),
        ({"optimizer": {"type": "DistributedLion", "params": [1e-3]}}, ["optimizer.params"]),
        (_dlion(zero_optimization={"stage": 1}), ["zero_optimization.stage=1", "own full momentum"]),
        (_dlion(zero_optimization={"stage": 2}), ["zero_optimization.stage=2", "ZeRO"]),
        (_dlion(zero_optimization={"stage": 3}), ["zero_optimization.stage=3", "ZeRO"]),
        (_dlion(zero_optimization=True), ["zero_optimization.stage=1"]),
        (
            _dlion(zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}}),
            ["zero_optimization.offload_optimizer.device", "own full momentum"],
        ),
        (_dlion(zero_optimization={"stage": 0, "cpu_offload": True}), ["zero_optimization.cpu_offload"]),
        (_dlion(gradient_clipping=-1.0), ["gradient_clipping", ">= 0"]),
        (_dlion(gradient_clipping="1.0"), ["gradient_clipping"]),
        (_dlion(torch_autocast={"enabled": True, "dtype": "torch.float16"}), ["torch_autocast.dtype=float16"]),
    ],
)
def test_bad_configs_are_refused_naming_the_key(cfg, needles):
    with pytest.raises(ValueError) as err:
        parse_deepspeed_config(cfg)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_offload_device_none_and_bf16_autocast_are_fine():
    cfg = _dlion(zero_optimization={"stage": 0, "offload_optimizer": {"device": "none"}},
                 torch_autocast={"enabled": True, "dtype": "torch.bfloat16"})
    assert parse_deepspeed_config(cfg) is not None


def test_bf16_with_pipeline_is_refused():
    cfg = _dlion(bf16={"enabled": True})
    assert parse_deepspeed_config(cfg) is not None  # plain engine: DeepSpeed's unfused wrapper, fine
    with pytest.raises(ValueError, match="bf16.enabled with a PipelineModule.*BF16_Optimizer.*partitions"):
        parse_deepspeed_config(cfg, pipeline=True)
    assert parse_deepspeed_config(_dlion(fp16={"enabled": True}), pipeline=True) is not None


def test_every_shipped_config_validates():
    from deepspeed.runtime.config import DeepSpeedConfig

    files = sorted(CONFIG_DIR.glob("*.json"))
    names = {f.stem for f in files}
    assert {"adamw_baseline", "dlion_mavo", "dlion_avg", "dlion_mavo_bf16", "dlion_avg_bf16"} <= names, names
    for path in files:
        raw = json.loads(path.read_text())
        plan = parse_deepspeed_config(str(path))  # also the path form
        if path.stem.startswith("dlion"):
            assert plan is not None, path
            assert plan.optimizer.aggregation == ("avg" if "avg" in path.stem else "mavo"), path
            ds_dict = plan.deepspeed_config
        else:
            assert plan is None, path
            ds_dict = raw
        # The part DeepSpeed reads is a valid DeepSpeed config (batch-size arithmetic at world size 1 included).
        ds = DeepSpeedConfig(json.loads(json.dumps(ds_dict)))
        assert ds.zero_optimization_stage == 0 or plan is None, path
        assert ds.bfloat16_config.enabled == path.stem.endswith("bf16"), path


def test_pins_of_the_deepspeed_internals_we_rely_on():
    from deepspeed.runtime import constants
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert constants.GRADIENT_CLIPPING_DEFAULT == DEEPSPEED_GRADIENT_CLIPPING_DEFAULT
    # The checkpoint wrappers bind against these signatures and read these argument names.
    save = inspect.signature(DeepSpeedEngine.save_checkpoint).parameters
    load = inspect.signature(DeepSpeedEngine.load_checkpoint).parameters
    assert list(save)[:3] == ["self", "save_dir", "tag"]
    assert list(load)[:3] == ["self", "load_dir", "tag"]
    assert {"load_optimizer_states", "load_module_only"} <= set(load)
    assert "save_checkpoint" not in PipelineEngine.__dict__ and "load_checkpoint" not in PipelineEngine.__dict__
    # DeepSpeed's unfused fp16/bf16 wrapper steps the optimizer once at construction (why the adapter waits to be
    # armed) and keeps fp16_groups/fp32_groups aligned (how clipping maps masters to model parameters).
    assert "self.optimizer.step()" in inspect.getsource(FP16_UnfusedOptimizer.initialize_optimizer_states)
    assert "fp32_groups" in inspect.getsource(FP16_UnfusedOptimizer.__init__)


def test_initialize_refuses_before_any_process_group():
    import torch.distributed as dist

    import distlion_ds

    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="zero_optimization.stage=2"):
        distlion_ds.initialize(model=model, config=_dlion(zero_optimization={"stage": 2}))
    with pytest.raises(ValueError, match="optimizer.params.aggregation"):
        distlion_ds.initialize(model=model, config=_dlion({"aggregation": "median"}))
    with pytest.raises(ValueError, match="optimizer= was passed too"):
        distlion_ds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=_dlion())
    args = SimpleNamespace(deepspeed_config=None, local_rank=0)
    args.deepspeed_config = _dlion(zero_optimization={"stage": 1})
    with pytest.raises(ValueError, match="zero_optimization.stage=1"):
        distlion_ds.initialize(args=args, model=model)
    assert not dist.is_initialized()


def test_other_configs_go_to_deepspeed_unchanged(monkeypatch):
    import deepspeed

    import distlion_ds

    calls = []

    def fake_initialize(**kwargs):
        calls.append(kwargs)
        return "engine", "optimizer", "loader", "scheduler"

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    model = torch.nn.Linear(4, 2)
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    params = list(model.parameters())
    out = distlion_ds.initialize(model=model, model_parameters=params, config=cfg, distributed_port=29999)
    assert out == ("engine", "optimizer", "loader", "scheduler")
    (kw,) = calls
    assert kw["config"] is cfg and kw["model"] is model and kw["model_parameters"] is params
    assert kw["distributed_port"] == 29999 and kw["optimizer"] is None and kw["config_params"] is None
    args = SimpleNamespace(deepspeed_config=str(CONFIG_DIR / "adamw_baseline.json"), local_rank=0)
    distlion_ds.initialize(args=args, model=model)
    assert calls[1]["args"] is args and calls[1]["config"] is None


def test_dlion_instance_with_a_plain_config_passes_through_with_a_warning(monkeypatch, caplog):
    import deepspeed

    import distlion_ds

    calls = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: calls.append(kw) or (None, None, None, None))
    model = torch.nn.Linear(4, 2)
    opt = distlion_ds.DistributedLion(model.parameters(), lr=1e-3)  # one process: no process group needed
    with caplog.at_level("WARNING", logger="distlion_ds.deepspeed.engine"):
        distlion_ds.initialize(model=model, optimizer=opt, config={"train_micro_batch_size_per_gpu": 2})
    assert calls[0]["optimizer"] is opt
    assert "keeps its fp32 gradient all-reduce" in caplog.text


def test_config_module_is_lean():
    code = (
        "import sys, distlion_ds.deepspeed.config as c; "
        "assert c.parse_deepspeed_config({'optimizer': {'type': 'DistributedLion'}}) is not None; "
        "bad = [m for m in ('deepspeed', 'triton', 'megatron') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ strict types (issue 9)


def test_deepspeed_builtin_optimizer_list_is_pinned():
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    from distlion_ds.deepspeed.config import DEEPSPEED_BUILTIN_OPTIMIZERS

    assert sorted(DEEPSPEED_BUILTIN_OPTIMIZERS) == sorted(DEEPSPEED_OPTIMIZERS)


@pytest.mark.parametrize(
    "cfg, needles",
    [
        (_dlion({"lr": True}), ["optimizer.params.lr", "valid number", "got True"]),  # was read as lr 1.0
        (_dlion({"lr": "1e-3"}), ["optimizer.params.lr", "got '1e-3'"]),
        (_dlion({"betas": [True, 0.99]}), ["optimizer.params.betas.0", "got True"]),
        (_dlion({"weight_decay": False}), ["optimizer.params.weight_decay"]),
        (_dlion({"raise_on_nonfinite": 1}), ["optimizer.params.raise_on_nonfinite", "valid boolean", "got 1"]),
        (_dlion({"check_replicas_every": True}), ["optimizer.params.check_replicas_every", "got True"]),
        (_dlion({"bucket_numel": 64.0}), ["optimizer.params.bucket_numel", "valid integer"]),
        (_dlion({"rounding_seed": 2**31}), ["optimizer.params.rounding_seed", "less than 2147483648"]),
        (_dlion({"rounding_seed": -1}), ["optimizer.params.rounding_seed", "greater than or equal to 0"]),
        (_dlion({"rounding_seed": None}), ["optimizer.params.rounding_seed"]),
        (_dlion(zero_optimization={"stage": None}), ["zero_optimization.stage", "0, 1, 2, 3", "None (NoneType)"]),
        (_dlion(zero_optimization={"stage": "0"}), ["zero_optimization.stage", "'0' (str)"]),
        (_dlion(zero_optimization={"stage": 0.0}), ["zero_optimization.stage", "0.0 (float)"]),
        (_dlion(zero_optimization=None), ["zero_optimization", "JSON object"]),
        (_dlion(gradient_clipping=True), ["gradient_clipping", "True (bool)"]),
        (_dlion(gradient_clipping=float("inf")), ["gradient_clipping", "finite"]),
        (_dlion(bf16={"enabled": "false"}), ["bf16.enabled", "true or false", "'false' (str)"]),
        (_dlion(distlion={"distributed_timeout_minutes": 0}), ["distlion.distributed_timeout_minutes", "greater"]),
        (_dlion(distlion={"distributed_timeout_minutes": True}), ["distlion.distributed_timeout_minutes", "True"]),
        (_dlion(distlion={"timeout": 5}), ["distlion.timeout", "unknown key", "distributed_timeout_minutes"]),
        (_dlion(distlion=[10]), ["distlion", "JSON object"]),
        (_dlion(p2p_compression=True), ["p2p_compression", "got True (bool)"]),  # reached open(1) before
        (_dlion(p2p_compression=1), ["p2p_compression", "got 1 (int)"]),
        (_dlion(p2p_compression={"activations": {"method": "topk", "ratio": True}}),
         ["p2p_compression.activations.ratio", "got True"]),
        ({"optimizer": {"type": "Lionn"}}, ["optimizer.type", "'Lionn'", "DistributedLion", "adamw", "lamb", "SGD"]),
        ({"optimizer": {"type": None}}, ["optimizer.type", "None"]),
        ({"optimizer": "adam"}, ["optimizer", "JSON object", "'adam' (str)"]),
    ],
)
def test_strict_types_refused_naming_key_and_value(cfg, needles):
    with pytest.raises(ValueError) as err:
        parse_deepspeed_config(cfg)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_p2p_true_does_not_close_stdout(capfd):
    with pytest.raises(ValueError, match="p2p_compression"):
        parse_deepspeed_config(_dlion(p2p_compression=True))
    sys.stdout.write("still open\n")
    sys.stdout.flush()
    assert "still open" in capfd.readouterr().out


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_dlion({"lr": True})))
    with pytest.raises(ValueError, match=f"DeepSpeed config {path}: .*optimizer.params.lr"):
        parse_deepspeed_config(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"DeepSpeed config {path}: invalid JSON"):
        parse_deepspeed_config(str(path))


def test_known_optimizer_types_pass_through():
    for name in ("AdamW", "adamw", "ADAM", "Lamb", "lion", "muon", "SGD", "RMSprop", "Adafactor"):
        assert parse_deepspeed_config({"optimizer": {"type": name, "params": {"lr": True}}}) is None, name
    assert parse_deepspeed_config({"optimizer": {"params": {}}}) is None  # no type: DeepSpeed builds none


def test_distlion_section_and_new_params():
    from distlion_ds.deepspeed.config import DistlionSection, parse_distlion_section, split_distlion_section

    plan = parse_deepspeed_config(_dlion({"rounding_seed": 7, "check_replicas_every": 0},
                                         distlion={"distributed_timeout_minutes": 2.5}))
    assert plan.distlion == DistlionSection(distributed_timeout_minutes=2.5)
    assert "distlion" not in plan.deepspeed_config
    kwargs = plan.optimizer.model_dump(exclude_none=True)
    assert kwargs["rounding_seed"] == 7 and kwargs["check_replicas_every"] == 0
    # Defaults: check_replicas_every None is left out of the kwargs (the optimizer's own default applies).
    default = parse_deepspeed_config(_dlion())
    assert default.distlion.distributed_timeout_minutes == 10.0
    assert "check_replicas_every" not in default.optimizer.model_dump(exclude_none=True)
    assert default.optimizer.rounding_seed == 0
    # The section is ours whatever the optimizer; DeepSpeed never sees it.
    raw = {"optimizer": {"type": "AdamW"}, "distlion": {"distributed_timeout_minutes": 1}}
    assert parse_deepspeed_config(raw) is None
    assert parse_distlion_section(raw).distributed_timeout_minutes == 1.0
    rest, section = split_distlion_section(raw)
    assert rest == {"optimizer": {"type": "AdamW"}} and section.distributed_timeout_minutes == 1.0
    assert parse_distlion_section({}) == DistlionSection()
    with pytest.raises(ValueError, match="distlion.distributed_timeout_minutes"):
        parse_distlion_section({"optimizer": {"type": "AdamW"}, "distlion": {"distributed_timeout_minutes": -1}})
