"""Test-suite setup.

The Triton kernels are tested on CPU through the Triton interpreter, which must be switched on before anything
imports triton (DESIGN section 4): conftest runs before any test module is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import distlion_ds  # noqa: E402  (lean: imports neither triton nor torch.cuda)

if importlib.util.find_spec("distlion_ds.kernels") is None:
    # A checkout that is not installed (the device check's machine, its pytest-xdist workers too): the repo folder
    # kernels/ is distlion_ds.kernels, as pyproject's package-dir maps it in an installation.
    distlion_ds.__path__.append(str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A small real corpus (25 stdlib files), SentencePiece 512 pieces, as indexed datasets: seconds, not 20 s."""
    from distlion_ds.data import prepare, stdlib_files

    root = tmp_path_factory.mktemp("megatron_data")
    corpus = root / "corpus"
    corpus.mkdir()
    files = [f for f in stdlib_files() if f.parent.name in ("json", "email")][:25]
    for i, f in enumerate(files):
        shutil.copy(f, corpus / f"{i:03d}_{f.name}")
    prepare(corpus=str(corpus), out=str(root / "data"), vocab_size=512, valid_every=5)
    return str(root / "data")


