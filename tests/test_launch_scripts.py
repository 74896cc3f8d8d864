"""launch/*.sh as printed: they find this clone's Python without a venv on PATH, and a missing config file is one
line naming it, with exit status 2, before any process starts."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))
BARE_PATH = "/usr/bin:/bin"  # no .venv/bin: `torchrun` and `deepspeed` are not commands here


def _run(script: pathlib.Path, args=(), env=None, cwd=ROOT, timeout=60):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TRITON_INTERPRET", "PYTHON", "TORCHRUN", "DEEPSPEED", "COMPRESSION", "NPROC", "STEPS",
                             "MASTER_PORT", "TORCHRUN_ARGS")}
    full_env["PATH"] = BARE_PATH
    full_env.update(env or {})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


MISSING = [
    ("3d_gpt.sh", [], {"COMPRESSION": "configs/compression/missing.json"}, "--p2p-compression",
     "configs/compression/missing.json"),
    ("3d_gpt.sh", ["--p2p-compression", "gone.json"], {}, "--p2p-compression", "gone.json"),
    ("megatron_gpt.sh", ["--train-iters", "2", "--p2p-compression", "configs/compression/missing.json"], {},
     "--p2p-compression", "configs/compression/missing.json"),
    ("megatron_gpt.sh", ["--p2p-compression=gone.json", "--train-iters", "2"], {}, "--p2p-compression", "gone.json"),
    ("deepspeed_gpt.sh", ["configs/deepspeed/missing.json", "2"], {}, "--deepspeed_config",
     "configs/deepspeed/missing.json"),
    ("deepspeed_gpt.sh", ["configs/deepspeed/dlion_mavo.json", "2", "--deepspeed_config", "gone.json"], {},
     "--deepspeed_config", "gone.json"),
]


@pytest.mark.parametrize("name,args,env,option,path", MISSING, ids=[f"{m[0]}-{m[4]}" for m in MISSING])
def test_missing_config_is_one_line_before_any_process(tmp_path, name, args, env, option, path):
    marker = tmp_path / "launcher_ran"
    # Were a launcher started, it would leave the marker behind.
    launcher = f"touch {marker}"
    proc = _run(ROOT / "launch" / name, args, env={**env, "TORCHRUN": launcher, "DEEPSPEED": launcher})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{name}: {option} {path}: no such file"), lines[0]
    assert not marker.exists()


def _fake_clone(tmp_path: pathlib.Path, with_venv: bool) -> tuple[pathlib.Path, pathlib.Path]:
    """A copy of launch/ and the default configs, with a stand-in interpreter that records its arguments."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "launch", clone / "launch")
    for cfg in ("compression/topk10_q8.json", "deepspeed/dlion_mavo.json"):
        (clone / "configs" / cfg).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "configs" / cfg, clone / "configs" / cfg)
    record = tmp_path / "argv.txt"
    bindir = clone / ".venv" / "bin" if with_venv else tmp_path / "bin"
    bindir.mkdir(parents=True)
    fake = bindir / ("python" if with_venv else "python3")
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" > {record}\n')
    fake.chmod(0o755)
    return clone, record


def test_scripts_run_this_clones_venv_python(tmp_path):
    clone, record = _fake_clone(tmp_path, with_venv=True)
    python = str(clone / ".venv" / "bin" / "python")

    proc = _run(clone / "launch" / "megatron_gpt.sh", ["--train-iters", "3"], env={"NPROC": "4"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == [
        python, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "29500",
        "-m", "distlion_ds.megatron.pretrain_gpt", "--train-iters", "3"]

    proc = _run(clone / "launch" / "3d_gpt.sh", ["--train-iters", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    assert argv[:8] == [python, "-m", "torch.distributed.run", "--nproc_per_node", "8", "--master_port", "29500",
                        "-m"]
    assert argv[argv.index("--p2p-compression") + 1] == str(clone / "configs" / "compression" / "topk10_q8.json")
    assert argv[-2:] == ["--train-iters", "2"]

    proc = _run(clone / "launch" / "deepspeed_gpt.sh", [], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == [
        python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29500",
        "--module", "distlion_ds.deepspeed.pretrain_gpt", "--deepspeed_config",
        str(clone / "configs" / "deepspeed" / "dlion_mavo.json")]


def test_scripts_fall_back_to_python3_on_path_without_a_venv(tmp_path):
    clone, record = _fake_clone(tmp_path, with_venv=False)
    proc = _run(clone / "launch" / "megatron_gpt.sh", ["--train-iters", "3"],
                env={"PATH": f"{tmp_path / 'bin'}:{BARE_PATH}"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines()[:3] == [str(tmp_path / "bin" / "python3"), "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_megatron_script_starts_torchrun_without_venv_on_path(tmp_path):
    """The real thing, one worker: torchrun starts the entry point, which answers --help."""
    assert shutil.which("torchrun", path=BARE_PATH) is None
    # The default interpreter is this clone's .venv (checked above with a stand-in); a suite run from another
    # environment names its own.
    env = {"NPROC": "1"} if (ROOT / ".venv" / "bin" / "python").exists() else {"NPROC": "1", "PYTHON": sys.executable}
    proc = _run(ROOT / "launch" / "megatron_gpt.sh", ["--help"], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: python -m distlion_ds.megatron.pretrain_gpt" in proc.stdout


def test_deepspeed_entry_names_a_missing_config_in_one_line(tmp_path):
    """Started without the script (e.g. by `deepspeed --module`), the entry refuses before any process group work."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "distlion_ds.deepspeed.pretrain_gpt", "--deepspeed_config",
                           "configs/deepspeed/missing.json"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"python -m distlion_ds.deepspeed.pretrain_gpt: --deepspeed_config configs/deepspeed/missing.json: no such "
        f"file (relative to {tmp_path}; the shipped configs are in configs/deepspeed/)"]
