"""Tokenizer training is deterministic: the same corpus gives the same SentencePiece model bytes, in one process and
across processes with different hash seeds and output folders (the demo's numbers depend on it)."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import sentencepiece as spm

from distlion_ds.data import corpus_documents, sample_lines, split, stdlib_files, train_tokenizer

# Small enough to train in about a second, large enough that the line sampling thins it (see the assertion below).
MAX_SENTENCES = 3000


def _corpus(root: pathlib.Path) -> pathlib.Path:
    corpus = root / "corpus"
    corpus.mkdir()
    files = [f for f in stdlib_files() if f.parent.name in ("json", "email")][:20]
    for i, f in enumerate(files):
        shutil.copy(f, corpus / f"{i:03d}_{f.name}")
    return corpus


def test_sample_lines_takes_an_even_stride_in_document_order():
    docs = [("a", "l0\nl1\n\nl2\n"), ("b", "  \nl3\nl4\nl5\nl6\nl7\nl8\nl9")]
    assert sample_lines(docs, 0) == [f"l{i}" for i in range(10)]
    assert sample_lines(docs, 10) == [f"l{i}" for i in range(10)]
    # floor(i * 10 / 4) for i = 0..3
    assert sample_lines(docs, 4) == ["l0", "l2", "l5", "l7"]


def test_same_corpus_same_model_bytes(tmp_path):
    train, _ = split(corpus_documents(str(_corpus(tmp_path))), 5)
    assert len(sample_lines(train, 0)) > 2 * MAX_SENTENCES  # the sampling is exercised, not bypassed
    first = train_tokenizer(train, 512, MAX_SENTENCES)
    second = train_tokenizer(train, 512, MAX_SENTENCES)
    assert first == second
    sp = spm.SentencePieceProcessor(model_proto=first)
    assert sp.get_piece_size() == 512 and sp.eos_id() == 2
    assert sp.decode(sp.encode("import json")) == "import json"
    # The bytes do depend on the input: the determinism above is not a constant output.
    assert train_tokenizer(train[1:], 512, MAX_SENTENCES) != first
    assert train_tokenizer(train, 600, MAX_SENTENCES) != first


def test_prepare_is_reproducible_across_processes(tmp_path):
    """Two fresh processes (different PYTHONHASHSEED, different output folders) write identical files."""
    corpus = _corpus(tmp_path)
    code = ("import sys; from distlion_ds.data import prepare; "
            f"prepare(corpus=sys.argv[1], out=sys.argv[2], vocab_size=512, valid_every=5, "
            f"max_sentences={MAX_SENTENCES})")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"data_{seed}"
        # A stale megatron-core index cache must not survive a rebuild (it indexes the old tokens).
        (out / "index_cache").mkdir(parents=True)
        (out / "index_cache" / "stale.npy").write_bytes(b"old")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONHASHSEED"] = seed
        proc = subprocess.run([sys.executable, "-c", code, str(corpus), str(out)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (out / "index_cache").exists()
        outs.append(out)
    for name in ("tokenizer.model", "tokenizer.vocab", "train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    meta = json.loads((outs[0] / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == hashlib.sha256((outs[0] / "tokenizer.model").read_bytes()).hexdigest()
    assert meta == json.loads((outs[1] / "meta.json").read_text())
