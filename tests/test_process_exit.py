"""distlion_ds.comm.exit_after_teardown: the entry points' exit keeps the status, the atexit work and the output."""

import subprocess
import sys

SCRIPT = r"""
import atexit, pathlib, sys
from distlion_ds.comm import exit_after_teardown

class Finalised:
    def __del__(self, path=sys.argv[2], open=open):  # runs at a normal interpreter exit; must not run here
        with open(path, "w") as f:
            f.write("finalised")

keep = Finalised()
atexit.register(lambda: pathlib.Path(sys.argv[1]).write_text("atexit ran"))
sys.stdout.write("unflushed line, no newline")
sys.stderr.write("unflushed error")
exit_after_teardown(7)
raise AssertionError("exit_after_teardown returned")
"""


def _run(script: str, tmp_path):
    marker, finalised = tmp_path / "atexit.txt", tmp_path / "finalised.txt"
    out = subprocess.run([sys.executable, "-c", script, str(marker), str(finalised)], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    return out, marker, finalised


def test_exit_keeps_status_atexit_and_streams_and_skips_finalization(tmp_path):
    out, marker, finalised = _run(SCRIPT, tmp_path)
    assert out.returncode == 7, out.stderr
    assert out.stdout == "unflushed line, no newline"  # piped stdout is block-buffered: flushed by the helper
    assert out.stderr == "unflushed error"
    assert marker.read_text() == "atexit ran"
    assert not finalised.exists()  # the object was never destroyed: no finalization ran


def test_control_a_normal_exit_does_finalise(tmp_path):
    """The control for the test above: the same script ending with sys.exit does destroy the object."""
    out, marker, finalised = _run(SCRIPT.replace("exit_after_teardown(7)", "sys.exit(7)"), tmp_path)
    assert out.returncode == 7, out.stderr
    assert marker.read_text() == "atexit ran"
    assert finalised.read_text() == "finalised"
