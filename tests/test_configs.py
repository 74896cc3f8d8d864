"""Every file under configs/ loads and validates through the parser that will read it."""

import json
import pathlib

import pytest

from distlion_ds.compress import CompressionConfig
from distlion_ds.deepspeed.config import load_deepspeed_config, parse_deepspeed_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".json", ".hjson"))


def test_every_config_file_is_covered():
    kinds = {p.parent.name for p in FILES}
    assert kinds == {"deepspeed", "compression", "clusters"}, kinds
    assert len(FILES) >= 19


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads(path):
    if path.parent.name == "compression":
        cfg = CompressionConfig.from_json(json.loads(path.read_text()))
        assert cfg.activations is not None and cfg.gradients is not None
        return
    raw = load_deepspeed_config(str(path))
    assert raw["zero_optimization"]["stage"] == 0
    plan = parse_deepspeed_config(raw)
    if raw["optimizer"]["type"].lower() == "distributedlion":
        assert plan is not None and plan.optimizer.lr > 0
        assert "optimizer" not in plan.deepspeed_config  # DeepSpeed gets our optimizer as an object
    else:
        assert plan is None  # any other optimizer goes to DeepSpeed unchanged


@pytest.mark.parametrize("cfg, needles", [
    ({"activations": {"method": "topk", "ratio": True}}, ["activations.ratio", "valid number", "got True"]),
    ({"gradients": {"method": "quantize", "bits": 8.0}}, ["gradients.bits", "2, 4, 8", "got 8.0"]),
    ({"gradients": {"method": "quantize", "bits": True}}, ["gradients.bits", "got True"]),
    ({"gradients": {"method": "quantize", "block_size": 256.0}}, ["gradients.block_size", "valid integer"]),
    ({"gradients": {"method": "quantize", "stochastic": 1}}, ["gradients.stochastic", "valid boolean", "got 1"]),
    ({"aqsgd": {"warmup_epochs": False}}, ["aqsgd.warmup_epochs", "got False"]),
    ({"aqsgd": {"path": 3}}, ["aqsgd.path", "got 3"]),
    ({"activations": {"method": "lz4"}}, ["activations.method", "'none', 'topk', 'quantize'", "got 'lz4'"]),
])
def test_compression_strict_types(cfg, needles, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    for source in (cfg, json.dumps(cfg), str(path)):
        with pytest.raises(ValueError) as e:
            CompressionConfig.from_json(source)
        for needle in needles:
            assert needle in str(e.value), (needle, str(e.value))
        assert (str(path) in str(e.value)) == (source == str(path))  # the file is named when there is one


@pytest.mark.parametrize("source", [True, False, 1, 0, None, [], 1.5])
def test_compression_source_of_another_type_refused_before_open(source, capfd):
    with pytest.raises(ValueError, match=r"p2p_compression: expected a JSON object .* got "):
        CompressionConfig.from_json(source, key="p2p_compression")
    print("stdout still open")  # from_json(True) once reached open(1) and closed file descriptor 1
    assert "stdout still open" in capfd.readouterr().out


def test_compression_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="neither a JSON document nor an existing file"):
        CompressionConfig.from_json(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"activations": ')
    with pytest.raises(ValueError, match=f"compression config {bad}: invalid JSON"):
        CompressionConfig.from_json(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"compression config {bad}: must be a JSON object"):
        CompressionConfig.from_json(str(bad))
