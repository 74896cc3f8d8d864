"""Fault injection for checkpoint tests: SIGKILL this process part-way through writing one checkpoint file."""

from __future__ import annotations

import os
import pathlib
import signal
import time


def kill_mid_write(marker: pathlib.Path, path_suffix: str, wait_for: pathlib.Path | None = None,
                   wait_s: float = 120.0) -> None:
    """From now on, SIGKILL this process after torch.save has streamed two chunks into the temporary of the file
    whose final path ends with ``path_suffix``; ``marker`` is written first, so the test can check that the kill
    happened where it was meant to. ``wait_for``: hold the kill until that file exists (another rank's write the
    test expects to be complete: on loaded machines the peer was still writing, and the spawn's clean-up tore it)."""
    from distlion_ds import checkpoint_io as cio

    original = cio._write_temporary

    def write_temporary(path, write):
        if not path.endswith(path_suffix):
            return original(path, write)

        class Torn:
            def __init__(self, f):
                self.f, self.calls = f, 0

            def write(self, data):
                self.calls += 1
                if self.calls == 3:
                    self.f.flush()
                    deadline = time.monotonic() + wait_s
                    while wait_for is not None and not wait_for.exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    marker.write_text("")
                    os.kill(os.getpid(), signal.SIGKILL)
                return self.f.write(data)

            def flush(self):
                self.f.flush()

            def fileno(self):
                return self.f.fileno()

        return original(path, lambda f: write(Torn(f)))

    cio._write_temporary = write_temporary
