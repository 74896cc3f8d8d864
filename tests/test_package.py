"""Packaging and layering: lean import, kernels/ installed as distlion_ds.kernels both ways, import rules, ruff."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_lean():
    code = ("import sys, distlion_ds; "
            "heavy = [m for m in ('triton', 'deepspeed', 'megatron') if m in sys.modules]; "
            "import torch; print(heavy, torch.cuda.is_initialized())")
    assert _run(code) == "[] False"


def test_public_api_resolves():
    code = ("import distlion_ds; from distlion_ds import kernels; "
            "print(distlion_ds.DistributedLion.__name__, kernels.pack_signs.__name__, "
            "distlion_ds.lion_update_ref.__name__)")
    assert _run(code) == "DistributedLion pack_signs lion_update_ref"


@pytest.mark.slow
def test_non_editable_install_imports_kernels(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    assert (target / "distlion_ds" / "kernels" / "signs.py").exists()
    assert not (target / "kernels").exists()  # no top-level `kernels` module to collide with others
    code = "import distlion_ds.kernels as k; print(k.__file__)"
    assert _run(code, PYTHONPATH=str(target)).startswith(str(target))


def test_editable_install_maps_kernels_folder():
    code = "import distlion_ds.kernels as k; print(k.__file__)"
    assert _run(code) == str(ROOT / "kernels" / "__init__.py")


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layering():
    """triton only under kernels/; torch.distributed only in comm, the DeepSpeed/Megatron seams and the demo.

    (The demo is an application: it runs DDP baselines and spawns its own process groups.)
    """
    dist_ok = ("distlion_ds/comm/", "distlion_ds/deepspeed/", "distlion_ds/megatron/", "distlion_ds/demo.py")
    files = list((ROOT / "distlion_ds").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))
    assert files
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        names = _imports(f)
        if any(n == "triton" or n.startswith("triton.") for n in names):
            assert rel.startswith("kernels/"), f"{rel} imports triton"
        if any(n.startswith("torch.distributed") for n in names):
            assert rel.startswith(dist_ok), f"{rel} imports torch.distributed"
        if rel.startswith("kernels/"):
            assert not any(n.startswith("distlion_ds") and not n.startswith("distlion_ds.kernels")
                           for n in names), f"{rel}: kernels import nothing above them"
