"""Test-suite setup.

The Triton kernels are tested on CPU through the Triton interpreter, which must be switched on before anything
imports triton (DESIGN section 4): conftest runs before any test module is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
