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
TIMEOUT_S = 170


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
                     "_lion_apply_kernel", "_quantize_kernel", "_dequantize_kernel", "_radix_hist_kernel",
                     "_radix_pick_kernel", "_count_kernel", "_write_kernel", "_scatter_kernel"}, names


def test_optimizer_step_and_codecs_compile(compiled):
    """DistributedLion.step (world size 1, MaVo/Avg, fp32/bf16) and every codec, on meta tensors."""
    failures = _failures(compiled, "integration")
    assert not failures, "\n\n".join(failures)
    cases = [c for res in compiled.values() for c in res["cases"] if c["group"] == "integration"]
    steps = [c for c in cases if c["case"].startswith("DistributedLion")]
    assert steps and all({"_lion_votes_kernel", "_vote_count_kernel", "_lion_apply_kernel"} <= set(c["kernels"])
                          for c in steps), [(c["case"], c["kernels"]) for c in steps]


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
