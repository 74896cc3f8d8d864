"""Ending a distributed entry point's process once its work is done."""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_after_teardown(status: int) -> NoReturn:
    """Exit with ``status`` after the ``atexit`` handlers, without the interpreter's finalization.

    For an entry point that has finished its work, saved what it saves and destroyed its process groups. torch 2.13's
    gloo can abort such a process during finalization ("terminate called without an active exception": a backend
    object that something still references is destroyed with its worker threads running), and a launcher then
    reports a finished run as failed. The ``atexit`` handlers (logging's flush, multiprocessing's finalizers, any a
    library registered) run first and the standard streams are flushed; only the destruction of leftover objects
    is skipped. A handler that raises is reported by ``atexit`` as at a normal exit, and does not change ``status``.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to lose
            pass
    os._exit(status)
