"""Every launcher path compiles for sm_80 and sm_90, and the PTX keeps the GPU-bits policy (issue 10, STYLE 16).

No GPU is needed: tests/_fake_cuda.py runs in a subprocess without ``TRITON_INTERPRET`` (the suite sets it, and the
interpreter compiles nothing), installs a fake CUDA driver, and drives the package's own launchers,
``DistributedLion.step`` and the codecs on meta tensors under ``kernels._dispatch.compile_only()``: Triton's JIT
warm-up, which specialises exactly as a real launch. One subprocess per arch, both at once (~1 min each cold on
2 cores; Triton's on-disk cache makes reruns fast). Registers per kernel are written to the test's tmp dir
(``gpu_compile_registers.json`` / ``.md``) and printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
ARCHS = (80, 90)
TIMEOUT_S = 300  # per arch, both at once; ~170 s cold on 2 loaded cores (2026-11-30), ~half that quiet


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, dict]:
    out_dir = tmp_path_factory.mktemp("gpu_compile")
    procs = {}
    for arch in ARCHS:
        out = out_dir / f"sm_{arch}.json"
        cmd = [sys.executable, str(HERE / "_fake_cuda.py"), "--arch", str(arch), "--out", str(out)]
        procs[arch] = (out, subprocess.Popen(cmd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True))
    results = {}
    for arch, (out, proc) in procs.items():
        try:
            log, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            pytest.fail(f"compiling for sm_{arch} took over {TIMEOUT_S} s:\n{log[-3000:]}")
        assert proc.returncode == 0, f"sm_{arch} compile driver failed:\n{log[-3000:]}"
        results[arch] = json.loads(out.read_text())
    _write_register_table(results, out_dir)
    return results


def _write_register_table(results: dict[int, dict], out_dir: Path) -> None:
    """Max registers and spills per kernel per arch over all specialisations, as JSON and a markdown table."""
    table: dict[str, dict[str, dict]] = {}
    for arch, res in results.items():
        for k in res["kernels"]:
            row = table.setdefault(k["kernel"], {}).setdefault(f"sm_{arch}", {"registers": 0, "spills": 0,
                                                                              "variants": 0, "num_warps": set()})
            row["registers"] = max(row["registers"], k["registers"])
            row["spills"] = max(row["spills"], k["spill_stores"] + k["spill_loads"])
            row["variants"] += 1
            row["num_warps"].add(k["num_warps"])
    triton_version = next(iter(results.values()))["triton"]
    lines = [f"Triton {triton_version}, max over every compiled specialisation (ptxas -v):", "",
             "| kernel | num_warps | " + " | ".join(f"sm_{a} registers (spills) [variants]" for a in ARCHS) + " |",
             "|---|---|" + "---|" * len(ARCHS)]
    for name, per_arch in sorted(table.items()):
        warps = sorted(set().union(*(r["num_warps"] for r in per_arch.values())))
        cells = [f"{per_arch[f'sm_{a}']['registers']} ({per_arch[f'sm_{a}']['spills']}) "
                 f"[{per_arch[f'sm_{a}']['variants']}]" if f"sm_{a}" in per_arch else "-" for a in ARCHS]
        lines.append(f"| `{name}` | {'/'.join(map(str, warps))} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    (out_dir / "gpu_compile_registers.md").write_text(text + "\n")
    (out_dir / "gpu_compile_registers.json").write_text(json.dumps(
        {"triton": triton_version, "kernels": [dict(k, arch=a) for a, r in results.items() for k in r["kernels"]]},
        indent=1))
    print("\n" + text + f"\n(written to {out_dir})")


def _failures(results: dict[int, dict], group: str) -> list[str]:
    return [f"sm_{arch} {c['case']}: {c['error']}\n{c.get('traceback', '')}"
            for arch, res in results.items() for c in res["cases"] if c["group"] == group and not c["ok"]]


def test_every_launcher_path_compiles(compiled):
    failures = _failures(compiled, "kernels")
    assert not failures, "\n\n".join(failures)
    names = {k["kernel"] for res in compiled.values() for k in res["kernels"]}
    assert names >= {"_pack_signs_kernel", "_unpack_signs_kernel", "_lion_votes_kernel", "_vote_count_kernel",
                     "_lion_apply_kernel", "_lion_votes_multi_kernel", "_lion_apply_multi_kernel", "_quantize_kernel",
                     "_dequantize_kernel", "_radix_hist_kernel",
                     "_radix_pick_kernel", "_count_kernel", "_write_kernel", "_scatter_kernel"}, names


def test_optimizer_step_and_codecs_compile(compiled):
    """DistributedLion.step (world size 1, MaVo/Avg, fp32/bf16) and every codec, on meta tensors."""
    failures = _failures(compiled, "integration")
    assert not failures, "\n\n".join(failures)
    cases = [c for res in compiled.values() for c in res["cases"] if c["group"] == "integration"]
    steps = [c for c in cases if c["case"].startswith("DistributedLion")]
    # Three parameters with gradients go through the multi-tensor kernels, the one without through the single ones.
    want = {"_lion_votes_multi_kernel", "_lion_votes_kernel", "_vote_count_kernel", "_lion_apply_multi_kernel",
            "_lion_apply_kernel"}
    assert steps and all(want <= set(c["kernels"]) for c in steps), [(c["case"], c["kernels"]) for c in steps]


def test_ptx_keeps_the_gpu_bits_policy(compiled):
    """No approximate division and no FMA anywhere: every kernel claims equality with its torch reference."""
    bad = [f"sm_{arch} {k['kernel']} ({k['cases'][0]}): div.full/approx {k['div_approx']}, fma {k['fma']}"
           for arch, res in compiled.items() for k in res["kernels"] if k["div_approx"] or k["fma"]]
    assert not bad, "\n".join(bad)
    # The divisions that exist are the IEEE-rounded ones (Avg's (2q - N) / N, the quantize scales).
    for res in compiled.values():
        avg = [k for k in res["kernels"] if k["kernel"] == "_lion_apply_kernel" and "avg" in k["cases"][0]]
        assert avg and all(k["div_rn"] > 0 for k in avg)
        assert all(k["div_rn"] > 0 for k in res["kernels"] if k["kernel"] == "_quantize_kernel")


def test_multi_tensor_kernels_vectorise_like_the_single_ones(compiled):
    """The multi-tensor kernels' full tiles load and store 16 bytes per access as the single-tensor kernels do,
    whatever the tensors' sizes (their addresses reach the compiler as offsets from an aligned pointer argument)."""
    for arch, res in compiled.items():
        by_case = {case: k for k in res["kernels"] for case in k["cases"]}
        pairs = [(f"lion_votes_multi grad={d}", f"lion_votes grad={d}") for d in ("float32", "bfloat16", "float16")]
        pairs += [(f"lion_apply_multi {a} N=1 {d}", f"lion_apply {a} N=1 {d}") for a in ("mavo", "avg")
                  for d in ("float32", "bfloat16", "float16")]
        for multi, single in pairs:
            m, s = by_case[multi], by_case[single]
            assert s["ld_v4"] > 0 and (m["ld_v4"], m["st_v4"]) == (s["ld_v4"], s["st_v4"]), (arch, multi, m, s)


def test_host_step_benchmark_counts_launches(compiled, tmp_path):
    """benchmarks/bench_host_step.py (after the compile fixture: its kernels come from Triton's cache): a 147-tensor
    step is 295 launches per tensor (votes and apply per tensor, one count) and 3 with the multi-tensor launchers."""
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "bench_host_step.py"), "--numel", "65536",
                           "--steps", "1", "--out", str(out)], env=_clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tensors"] == 147
    assert result["launches_per_step"] == {"per tensor": 2 * 147 + 1, "multi-tensor": 3}


def test_no_kernel_spills(compiled):
    spills = [f"sm_{arch} {k['kernel']} ({k['cases'][0]}): {k['registers']} registers, "
              f"{k['spill_stores']} B spill stores, {k['spill_loads']} B spill loads at num_warps={k['num_warps']}"
              for arch, res in compiled.items() for k in res["kernels"] if k["spill_stores"] or k["spill_loads"]]
    assert not spills, "\n".join(spills)
    assert all(k["registers"] > 0 for res in compiled.values() for k in res["kernels"])


def test_ptx_checks_detect_violations(compiled):
    """The PTX checks can fail: a control kernel with ``/`` and ``a*b + c`` compiled with fusion on is caught."""
    for arch, res in compiled.items():
        control = res["controls"]
        assert control and all(c["div_approx"] > 0 and c["fma"] > 0 for c in control), (arch, control)


# ------------------------------------------------------------------------- benchmarks/gpu_check.py without a GPU
REPO = HERE.parent
GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    """benchmarks/gpu_check.py as a module; its import sets TRITON_INTERPRET, restored after the test."""
    import importlib.util

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_arguments_and_no_device(gpu_check, tmp_path, capsys):
    args = gpu_check.parse_args(["--numel", "4096", "--ranks", "8"])
    assert (args.numel, args.ranks, args.device, args.dry_run) == (4096, 8, "cuda", False)
    for bad in (["--numel", "1000"], ["--ranks", "65"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
    if torch_cuda_available():
        pytest.skip("this machine has a CUDA device: the no-device exit is not reachable")
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"] == {} and report["environment"]["device"] == "no CUDA device"


def test_gpu_check_report_tables(gpu_check):
    env = {"date": "2026-11-30 10:00 UTC", "device": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0",
           "python": "3.12.3", "kernels_from": "kernels/__init__.py", "package": "repo path shim", "run_on": "cuda"}
    result = {"environment": env, "dry_run": False, "sections": {
        "tests": {"ok": False, "seconds": 80.0, "counts": {"passed": 34, "failed": 1},
                  "failed": ["tests/test_gpu_kernels.py::test_topk_on_gpu[dtype0]"]},
        "bandwidth": {"ok": True, "seconds": 9.0, "numel": 1024, "ranks": 4, "rows": [
            {"kernel": "copy (D2D, limit)", "ms": 0.5, "GB/s": 3000.0, "frac_of_copy": 1.0},
            {"kernel": "pack_signs", "ms": 0.25, "GB/s": 2700.0, "frac_of_copy": 0.9}]},
        "topk": {"ok": True, "seconds": 3.0, "numel": 1024, "k": 102, "ms": 1.0, "torch_topk_ms": 6.0,
                 "speedup_vs_torch_topk": 6.0, "exact_vs_reference": True},
        "dlion": {"ok": False, "seconds": 1.0, "error": "RuntimeError: boom"},
    }}
    md = gpu_check.render_markdown(result)
    assert "### Device check (2026-11-30 10:00 UTC, NVIDIA H200)" in md
    assert "| pack_signs | 0.250 | 2700.0 | 0.90 |" in md
    assert "| 1024 | 102 | 1.000 | 6.000 | 6.00x | True |" in md
    assert "**tests**: FAILED" in md and "test_topk_on_gpu[dtype0]" in md
    assert "**dlion**: FAILED (1.0 s) — `RuntimeError: boom`" in md


def test_gpu_check_self_test_without_installation(tmp_path):
    """The whole script on CPU (kernels interpreted, tiny sizes) with the package NOT importable from site-packages:
    ``python -S`` skips the editable install's .pth hook, so ``distlion_ds.kernels`` must come from the path shim."""
    import sysconfig

    code = ("import sys, runpy; sys.path.append(sys.argv[1]); "
            "sys.argv = [sys.argv[2], '--device=cpu', '--numel', '8192', '--out-dir', sys.argv[3]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-S", "-c", code, sysconfig.get_paths()["purelib"], str(GPU_CHECK),
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["package"] == "repo path shim"
    assert report["environment"]["kernels_from"] == os.path.join("kernels", "__init__.py")
    sections = report["sections"]
    assert set(sections) == {"bandwidth", "topk", "dlion", "codecs"}
    assert all(s["ok"] for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    assert len(sections["bandwidth"]["rows"]) == 21 and sections["topk"]["exact_vs_reference"]
    assert [(r["layout"], r["tensors"]) for r in sections["dlion"]["layouts"]] == [
        ("separate, multi-tensor", 147), ("separate, per tensor", 147), ("flat", 147)]
    assert all(r["payload_equal_to_cpu"] and r["decode_equal_to_cpu"] for r in sections["codecs"]["rows"])
    assert "| kernel | ms | GB/s | of D2D copy |" in (tmp_path / "gpu_check.md").read_text()
    assert "Self CPU time total" in (tmp_path / "topk_profile.txt").read_text()  # per-kernel (per-op) time


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
