"""Property-based fuzzing of the DeepSpeed and compression config schemas (issue 9, item 7).

Each example starts from a valid config, applies valid changes to a random set of keys and at most one invalid
change. The oracle is the tables below, written from the documented schema (DESIGN 3.3, the DistributedLion
arguments), not from the parsers: an example with an invalid change must be refused with a ValueError naming the
key path (and the file, when it came from one); an example without one must be accepted with the values it set.
Deterministic (derandomize) and bounded (max_examples) for CI; ``pytest --hypothesis-show-statistics`` prints how
many examples were valid and invalid.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distlion_ds.compress import CompressionConfig
from distlion_ds.deepspeed.config import parse_deepspeed_config

SETTINGS = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------------------------------------- value pools
finite = st.floats(allow_nan=False, allow_infinity=False)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
junk_scalar = st.one_of(st.booleans(), st.none(), st.text(max_size=6), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


def positive_number():
    return st.one_of(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False), st.integers(1, 10**6))


def not_a_number():
    return st.one_of(st.booleans(), st.none(), st.text(max_size=6), st.lists(finite, max_size=2))


def not_an_int():
    return st.one_of(st.booleans(), st.none(), st.text(max_size=6), finite)


def unknown_key(allowed):
    return st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(lambda k: k not in allowed)


# ----------------------------------------------------------------------------------------------- DeepSpeed
PARAM_KEYS = {"lr", "betas", "weight_decay", "aggregation", "raise_on_nonfinite", "check_replicas_every",
              "bucket_numel", "rounding_seed"}
# Every key DistributedLionParams knows (an "unknown" key must be none of them)
KNOWN_PARAM_KEYS = PARAM_KEYS | {"intra_node_size", "local_steps", "inner_optimizer"}
beta = st.one_of(st.floats(min_value=0.0, max_value=0.999999, allow_nan=False), st.just(0))
PARAMS_VALID = {
    "lr": positive_number(),
    "betas": st.lists(beta, min_size=2, max_size=2),
    "weight_decay": st.one_of(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), st.integers(0, 10)),
    "aggregation": st.sampled_from(["mavo", "avg"]),
    "raise_on_nonfinite": st.booleans(),
    "check_replicas_every": st.one_of(st.none(), st.integers(0, 10**6)),
    "bucket_numel": st.one_of(st.none(), st.integers(8, 2**40)),
    "rounding_seed": st.integers(0, 2**31 - 1),
}
PARAMS_INVALID = {
    "lr": st.one_of(not_a_number(), non_finite, st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0)),
    "betas": st.one_of(
        st.lists(beta, min_size=0, max_size=1), st.lists(beta, min_size=3, max_size=4),
        st.tuples(st.floats(min_value=1.0, allow_nan=False, allow_infinity=False), beta).map(list),
        st.tuples(beta, st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)).map(list),
        st.tuples(st.booleans(), beta).map(list), st.tuples(beta, st.text(max_size=3)).map(list),
        st.tuples(non_finite, beta).map(list), st.booleans(), st.none(), finite),
    "weight_decay": st.one_of(not_a_number(), non_finite, st.floats(max_value=-1e-12, allow_nan=False),
                              st.integers(max_value=-1)),
    "aggregation": st.one_of(st.text(max_size=6).filter(lambda s: s not in ("mavo", "avg")), st.booleans(),
                             st.integers(), st.none(), st.sampled_from(["MaVo", "AVG", "mean"])),
    "raise_on_nonfinite": st.one_of(st.integers(0, 1), st.sampled_from(["true", "false", "yes"]), st.none(), finite),
    "check_replicas_every": st.one_of(st.integers(max_value=-1), st.booleans(), finite, st.text(max_size=4)),
    "bucket_numel": st.one_of(st.integers(max_value=7), st.booleans(), finite, st.text(max_size=4)),
    "rounding_seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31), st.booleans(), st.none(),
                               finite, st.text(max_size=4)),
}
# Top-level keys we validate, with their valid and invalid values, and the key path an error must name.
TOP_VALID = {
    ("distlion", "distributed_timeout_minutes"): positive_number(),
    ("gradient_clipping",): st.one_of(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), st.integers(0, 9)),
    ("zero_optimization", "stage"): st.just(0),
    ("bf16", "enabled"): st.booleans(),
}
TOP_INVALID = {
    ("distlion", "distributed_timeout_minutes"): st.one_of(
        not_a_number(), non_finite, st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0)),
    ("gradient_clipping",): st.one_of(not_a_number(), non_finite, st.floats(max_value=-1e-12, allow_nan=False)),
    # stage 1-3 are DeepSpeed's, refused for D-Lion; null, strings, floats, bools are nobody's
    ("zero_optimization", "stage"): st.one_of(st.integers(1, 3), st.none(), st.text(max_size=3), finite,
                                              st.booleans(), st.integers(min_value=4), st.integers(max_value=-1)),
    ("bf16", "enabled"): st.one_of(st.integers(0, 1), st.sampled_from(["true", "false"]), st.none()),
}


@st.composite
def deepspeed_examples(draw):
    """(config, expected valid values, the key path an error must name or None)."""
    cfg = {"train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": draw(st.sampled_from(["DistributedLion", "distributedlion", "DISTRIBUTEDLION"])),
                         "params": {}}}
    expect = {}
    for key in sorted(draw(st.sets(st.sampled_from(sorted(PARAM_KEYS))))):
        cfg["optimizer"]["params"][key] = expect[("optimizer", "params", key)] = draw(PARAMS_VALID[key])
    for path in draw(st.sets(st.sampled_from(sorted(TOP_VALID)))):
        _set(cfg, path, draw(TOP_VALID[path]))
        expect[path] = _get(cfg, path)
    kind = draw(st.sampled_from(["none", "param", "param_unknown", "top", "distlion_unknown", "distlion_type",
                                 "p2p", "optimizer_type", "optimizer_section", "params_section"]))
    needle = None
    if kind == "param":
        key = draw(st.sampled_from(sorted(PARAMS_INVALID)))
        cfg["optimizer"]["params"][key] = draw(PARAMS_INVALID[key])
        needle = f"optimizer.params.{key}"
    elif kind == "param_unknown":
        key = draw(unknown_key(KNOWN_PARAM_KEYS))
        cfg["optimizer"]["params"][key] = draw(st.integers())
        needle = f"optimizer.params.{key}"
    elif kind == "top":
        path = draw(st.sampled_from(sorted(TOP_INVALID)))
        _set(cfg, path, draw(TOP_INVALID[path]))
        needle = ".".join(path)
    elif kind == "distlion_unknown":
        key = draw(unknown_key({"distributed_timeout_minutes"}))
        cfg.setdefault("distlion", {})[key] = draw(st.integers())
        needle = f"distlion.{key}"
    elif kind == "distlion_type":
        cfg["distlion"] = draw(st.one_of(st.booleans(), st.integers(), st.text(max_size=4), st.lists(st.integers())))
        needle = "distlion"
    elif kind == "p2p":
        # true once reached open(1) and closed stdout; a missing path is refused too
        cfg["p2p_compression"] = draw(st.one_of(st.booleans(), st.integers(), st.lists(st.integers(), max_size=2),
                                                st.none(), st.just("no/such/compression.json")))
        needle = "p2p_compression"
    elif kind == "optimizer_type":
        cfg["optimizer"]["type"] = draw(st.one_of(
            st.text("abcdefghijklmnopqrstuvwxyzABC", min_size=1, max_size=10).filter(_known_nowhere),
            st.booleans(), st.integers(), st.none()))
        needle = "optimizer.type"
    elif kind == "optimizer_section":
        cfg["optimizer"] = draw(st.one_of(st.booleans(), st.integers(), st.text(max_size=6), st.lists(st.integers())))
        needle = "optimizer"
    elif kind == "params_section":
        cfg["optimizer"]["params"] = draw(st.one_of(st.booleans(), st.integers(), st.lists(st.integers())))
        needle = "optimizer.params"
    return cfg, expect, needle


def _known_nowhere(name: str) -> bool:
    import torch.optim

    # The oracle for "an optimizer type DeepSpeed does not know": DeepSpeed's own test of the name
    # (engine._is_supported_optimizer: built-in or an attribute of torch.optim), minus torch.optim's non-optimizer
    # attributes; and not ours.
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    attr = getattr(torch.optim, name, None)
    is_torch_optimizer = isinstance(attr, type) and issubclass(attr, torch.optim.Optimizer)
    return name.lower() not in DEEPSPEED_OPTIMIZERS and not is_torch_optimizer and name.lower() != "distributedlion"


def _same_typed(a, b) -> bool:
    if type(a) is not type(b) and not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_typed(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_typed(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _as_file(cfg, tmp_path_factory, name):
    """The config written to a JSON file; the dict itself when the file cannot hold the same values: NaN / Infinity
    (not JSON), or a float with an integral value, which hjson (DeepSpeed's reader) reads back as an int (``0.0`` ->
    ``0``), so the file holds another config than the one whose expectation was drawn."""
    try:
        text = json.dumps(cfg, allow_nan=False)
    except ValueError:
        return cfg
    import hjson

    if not _same_typed(hjson.loads(text), cfg):
        return cfg
    path = tmp_path_factory.mktemp("cfg") / name
    path.write_text(text)
    return str(path)


def _set(cfg, path, value):
    for key in path[:-1]:
        cfg = cfg.setdefault(key, {})
    cfg[path[-1]] = value


def _get(cfg, path):
    for key in path:
        cfg = cfg[key]
    return cfg


@SETTINGS
@given(example=deepspeed_examples(), as_file=st.booleans())
def test_deepspeed_config_fuzz(example, as_file, tmp_path_factory):
    cfg, expect, needle = example
    source = _as_file(cfg, tmp_path_factory, "ds_config.json") if as_file else cfg
    as_file = source is not cfg
    if needle is None:
        event("valid")
        plan = parse_deepspeed_config(source)
        assert plan is not None
        for path, value in expect.items():
            if path[:2] == ("optimizer", "params"):
                got = getattr(plan.optimizer, path[2])
                assert (list(got) if path[2] == "betas" else got) == value, path
            elif path[0] == "distlion":
                assert plan.distlion.distributed_timeout_minutes == value
            elif path == ("gradient_clipping",):
                assert plan.gradient_clipping == value and plan.deepspeed_config["gradient_clipping"] == 0.0
        assert "distlion" not in plan.deepspeed_config and "optimizer" not in plan.deepspeed_config
        return
    event(f"invalid: {re.split(r'[.: ]', needle)[0]}")
    with pytest.raises(ValueError) as e:
        parse_deepspeed_config(source)
    msg = str(e.value)
    assert needle in msg, (needle, msg)
    if as_file:
        assert source in msg, msg


@settings(SETTINGS, max_examples=300)
@given(example=deepspeed_examples())
def test_distlion_and_p2p_sections_checked_whatever_the_optimizer(example):
    """The "distlion" and "p2p_compression" sections are ours for every optimizer type, D-Lion's keys are not."""
    cfg, _, needle = example
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": True, "whatever": 1}}  # DeepSpeed's business
    cfg.pop("zero_optimization", None)
    cfg.pop("gradient_clipping", None)
    cfg.pop("bf16", None)
    ours = needle is not None and needle.split(".")[0] in ("distlion", "p2p_compression")
    if ours:
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            parse_deepspeed_config(cfg)
    else:
        assert parse_deepspeed_config(cfg) is None


# ----------------------------------------------------------------------------------------------- compression
METHODS = ("none", "topk", "quantize")
FEEDBACK = ("none", "ef", "ef21", "aqsgd")


@st.composite
def codec_valid(draw, direction):
    method = draw(st.sampled_from(METHODS))
    feedbacks = ["none"] if method == "none" else [f for f in FEEDBACK if direction == "activations" or f != "aqsgd"]
    out = {"method": method}
    if draw(st.booleans()):
        out["feedback"] = draw(st.sampled_from(feedbacks))
    if method == "topk" and draw(st.booleans()):
        out["ratio"] = draw(st.one_of(st.floats(min_value=1e-9, max_value=1.0, allow_nan=False), st.just(1)))
    if method == "quantize":
        if draw(st.booleans()):
            out["bits"] = draw(st.sampled_from([2, 4, 8]))
        if draw(st.booleans()):
            out["block_size"] = 8 * draw(st.integers(1, 2048))
        if draw(st.booleans()):
            out["stochastic"] = draw(st.booleans())
    return out


CODEC_INVALID = {
    "topk": {
        "ratio": st.one_of(st.booleans(), st.none(), st.text(max_size=4), non_finite,
                           st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0000001, allow_nan=False,
                                                                                allow_infinity=False)),
        "feedback": st.one_of(st.text(max_size=5).filter(lambda s: s not in FEEDBACK), st.booleans(), st.none()),
    },
    "quantize": {
        "bits": st.one_of(st.integers().filter(lambda b: b not in (2, 4, 8)), st.sampled_from([8.0, 4.0, True]),
                          st.text(max_size=2), st.none()),
        "block_size": st.one_of(st.integers(max_value=0), st.integers(1, 16384).filter(lambda b: b % 8),
                                st.integers(min_value=16385).map(lambda b: b * 8), st.sampled_from([256.0, True]),
                                st.text(max_size=3)),
        "stochastic": st.one_of(st.integers(0, 1), st.sampled_from(["true", "false"]), st.none(), finite),
        "feedback": st.one_of(st.text(max_size=5).filter(lambda s: s not in FEEDBACK), st.booleans(), st.none()),
    },
    "none": {"feedback": st.sampled_from(["ef", "ef21", "aqsgd", "bogus"])},
}
AQSGD_VALID = {
    "warmup_epochs": st.integers(0, 10**6),
    "store": st.sampled_from(["device", "cpu"]),
    "buffer_dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
    "path": st.one_of(st.none(), st.text("abc/_.", min_size=1, max_size=10)),
}
AQSGD_INVALID = {
    "warmup_epochs": st.one_of(st.integers(max_value=-1), st.booleans(), finite, st.text(max_size=3), st.none()),
    "store": st.one_of(st.text(max_size=5).filter(lambda s: s not in ("device", "cpu", "disk")), st.booleans()),
    "buffer_dtype": st.one_of(st.sampled_from(["int8", "fp32", "float64"]), st.booleans(), st.integers()),
    "path": st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=1)),
}


@st.composite
def compression_examples(draw):
    cfg, expect = {}, {}
    for direction in ("activations", "gradients"):
        if draw(st.booleans()):
            cfg[direction] = draw(codec_valid(direction))
            for k, v in cfg[direction].items():
                expect[(direction, k)] = v
    if draw(st.booleans()):
        aq = {k: draw(v) for k, v in AQSGD_VALID.items() if draw(st.booleans())}
        if draw(st.booleans()):
            aq["store"], aq["path"] = "disk", draw(st.text("abc/_.", min_size=1, max_size=10))
        cfg["aqsgd"] = aq
        for k, v in aq.items():
            expect[("aqsgd", k)] = v
    if draw(st.booleans()):
        cfg["inference"] = expect[("inference",)] = draw(st.sampled_from(["compressed", "uncompressed"]))
    kind = draw(st.sampled_from(["none", "codec_field", "codec_method", "codec_unknown", "codec_type",
                                 "grad_aqsgd", "aqsgd_field", "aqsgd_disk", "inference", "top_unknown"]))
    needle = None
    direction = draw(st.sampled_from(["activations", "gradients"]))
    if kind == "codec_field":
        method = draw(st.sampled_from(METHODS))
        key = draw(st.sampled_from(sorted(CODEC_INVALID[method])))
        cfg[direction] = {"method": method, key: draw(CODEC_INVALID[method][key])}
        needle = f"{direction}.{key}"
    elif kind == "codec_method":
        cfg[direction] = {"method": draw(st.one_of(st.text(max_size=6).filter(lambda s: s not in METHODS),
                                                   st.booleans(), st.integers(), st.none()))}
        needle = f"{direction}.method"
    elif kind == "codec_unknown":
        method = draw(st.sampled_from(METHODS))
        allowed = {"none": {"method", "feedback"}, "topk": {"method", "feedback", "ratio"},
                   "quantize": {"method", "feedback", "bits", "block_size", "stochastic"}}[method]
        key = draw(unknown_key(allowed))
        cfg[direction] = {"method": method, key: 1}
        needle = f"{direction}: unknown key(s) ['{key}']"
    elif kind == "codec_type":
        cfg[direction] = draw(st.one_of(st.booleans(), st.integers(), st.text(max_size=5), st.none(),
                                        st.lists(st.integers(), max_size=2)))
        needle = direction
    elif kind == "grad_aqsgd":
        cfg["gradients"] = {"method": draw(st.sampled_from(["topk", "quantize"])), "feedback": "aqsgd"}
        needle = "gradients.feedback"
    elif kind == "aqsgd_field":
        key = draw(st.sampled_from(sorted(AQSGD_INVALID)))
        cfg["aqsgd"] = {key: draw(AQSGD_INVALID[key])}
        needle = f"aqsgd.{key}"
    elif kind == "aqsgd_disk":
        cfg["aqsgd"] = {"store": "disk", **draw(st.sampled_from([{}, {"path": None}, {"path": ""}]))}
        needle = "aqsgd.path"
    elif kind == "inference":
        cfg["inference"] = draw(st.one_of(st.text(max_size=6).filter(lambda s: s not in ("compressed",
                                                                                          "uncompressed")),
                                          st.booleans(), st.none(), st.integers()))
        needle = "inference"
    elif kind == "top_unknown":
        key = draw(unknown_key({"activations", "gradients", "aqsgd", "inference"}))
        cfg[key] = draw(st.integers())
        needle = f"unknown key(s) ['{key}']"
    return cfg, expect, needle


@settings(SETTINGS, max_examples=3000)
@given(example=compression_examples(), form=st.sampled_from(["dict", "json", "file"]))
def test_compression_config_fuzz(example, form, tmp_path_factory):
    cfg, expect, needle = example
    source = cfg
    if form == "json":
        source = json.dumps(cfg, allow_nan=True)  # Python's json reads NaN / Infinity back
    elif form == "file":
        source = _as_file(cfg, tmp_path_factory, "compression.json")
        form = "file" if source is not cfg else "dict"
    if needle is None:
        event("valid")
        c = CompressionConfig.from_json(source)
        for path, value in expect.items():
            got = getattr(getattr(c, path[0]), path[1]) if len(path) == 2 else getattr(c, path[0])
            assert got == value and type(got) is type(value) or (isinstance(value, int) and type(got) is float
                                                                 and got == value), (path, got, value)
        return
    event(f"invalid: {re.split(r'[.: ]', needle)[0]}")
    with pytest.raises(ValueError) as e:
        CompressionConfig.from_json(source)
    msg = str(e.value)
    assert needle in msg, (needle, msg)
    if form == "file":
        assert source in msg, msg



def test_known_param_keys_are_the_models_fields():
    from distlion_ds.deepspeed.config import DistributedLionParams

    assert KNOWN_PARAM_KEYS == set(DistributedLionParams.model_fields)
