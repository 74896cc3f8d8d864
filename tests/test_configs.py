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
