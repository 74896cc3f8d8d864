"""Corpus preparation: SentencePiece tokenizer + megatron-core indexed dataset, and GPTDataset loading.

    python -m distlion_ds.data prepare [--corpus stdlib|DIR|FILE.jsonl] [--out data_cache/stdlib]
                                       [--vocab-size 4096] [--valid-every 50]

The default corpus is one every machine has without a download: the Python standard library's own source files
(``sysconfig.get_paths()["stdlib"]``, site-packages excluded). Files are split into train/validation by file (every
``valid-every``-th file in sorted path order goes to validation), so the split is the same on every machine with the
same Python. Output, under ``--out``:

    tokenizer.model / .vocab   SentencePiece BPE model trained on the training split
    train.bin / train.idx      megatron-core IndexedDataset (one document per file, EOD appended)
    valid.bin / valid.idx
    meta.json                  corpus, file counts, token counts, vocab size, a fingerprint of the inputs

Idempotent: when ``meta.json`` exists with the same fingerprint (file list, sizes, options), nothing is redone.
Deterministic: the same corpus and options give the same ``tokenizer.model`` bytes (``meta.json`` records their
sha256) and the same datasets, whatever the machine's core count or hash seed. The stdlib corpus is the same only
with the same Python version (``meta.json`` records it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import sysconfig
import warnings

import numpy as np

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
# Part of the dataset fingerprint: bumped when the tokenizer training changes, so caches made before are redone.
# 2: deterministic line sampling and options (1 was SentencePiece's unseeded shuffle).
TOKENIZER_RECIPE = 2


def stdlib_files() -> list[pathlib.Path]:
    """The standard library's .py files, site-packages and caches excluded, in sorted order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "__pycache__" not in p.parts and p.is_file())


def corpus_documents(corpus: str) -> list[tuple[str, str]]:
    """(name, text) per document of ``corpus``: ``stdlib``, a folder of text files, or a JSONL file with "text"."""
    if corpus == "stdlib":
        files = stdlib_files()
    else:
        path = pathlib.Path(corpus)
        if path.is_file() and path.suffix == ".jsonl":
            docs = []
            with path.open() as f:
                for i, line in enumerate(f):
                    if line.strip():
                        row = json.loads(line)
                        if "text" not in row:
                            raise ValueError(f"{path}:{i + 1}: JSONL rows need a \"text\" field")
                        docs.append((f"{path.name}:{i}", row["text"]))
            return docs
        if not path.is_dir():
            raise ValueError(f"--corpus {corpus!r}: expected 'stdlib', a folder of text files, or a .jsonl file")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    docs = []
    for p in files:
        try:
            docs.append((str(p), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError) as exc:  # a few stdlib test files are deliberately not UTF-8
            logger.info("skipping %s: %s", p, exc)
    if not docs:
        raise ValueError(f"--corpus {corpus!r} holds no readable text documents")
    return docs


def split(docs, valid_every: int):
    train = [d for i, d in enumerate(docs) if i % valid_every != valid_every - 1]
    valid = [d for i, d in enumerate(docs) if i % valid_every == valid_every - 1]
    return train, valid


def _fingerprint(docs, opts: dict) -> str:
    h = hashlib.sha256(json.dumps(opts, sort_keys=True).encode())
    for name, text in docs:
        h.update(f"{name}\0{len(text)}\0".encode())
    return h.hexdigest()[:16]


def sample_lines(docs, max_sentences: int) -> list[str]:
    """The non-blank lines of ``docs`` in document order, thinned to at most ``max_sentences`` by an even stride.

    The stride replaces SentencePiece's own reservoir sampling (``shuffle_input_sentence``), which draws from an
    unseeded generator: the same corpus gave a different tokenizer on every run, and other demo numbers.
    """
    lines = [line for _, text in docs for line in text.splitlines() if line.strip()]
    if max_sentences <= 0 or len(lines) <= max_sentences:
        return lines
    return [lines[i * len(lines) // max_sentences] for i in range(max_sentences)]


def train_tokenizer(docs, vocab_size: int, max_sentences: int) -> bytes:
    """The serialized SentencePiece BPE model trained on ``docs``; the same documents give the same bytes.

    Besides the pieces, the model file records the trainer options: the output is taken as bytes (no
    ``model_prefix``, which would record the output path) and one thread is used (the thread count is recorded too;
    on the stdlib corpus training takes ~3 s with 1 thread and ~2.6 s with 2, and the pieces are the same).
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_lines(docs, max_sentences)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, input_sentence_size=0,
        shuffle_input_sentence=False, split_digits=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, eos_id=2, bos_id=1, pad_id=-1, unk_id=0, num_threads=1, minloglevel=2)
    return model.getvalue()


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _megatron_import():
    """Import megatron-core without its one known CPU warning; every other warning still shows.

    The first megatron-core import warns that Transformer Engine and Apex are absent and that it falls back to its
    local implementations (of fused multi-tensor ops this package never calls): the expected set-up on CPU.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
        yield


def _write_indexed(prefix: pathlib.Path, docs, sp, eod: int, desc: str) -> int:
    import torch
    from tqdm import tqdm

    with _megatron_import():
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = np.uint16 if sp.get_piece_size() < 65500 else np.int32
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    total = 0
    for _, text in tqdm(docs, desc=desc, unit="doc", mininterval=1.0):
        ids = sp.encode(text) + [eod]
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
        total += len(ids)
    builder.finalize(str(prefix) + ".idx")
    return total


def prepare(corpus: str = "stdlib", out: str = "data_cache/stdlib", vocab_size: int = 4096,
            valid_every: int = 50, max_sentences: int = 300_000) -> dict:
    """Train the tokenizer and write the train/valid datasets (see the module docstring). Returns meta.json."""
    import sentencepiece as spm

    if vocab_size < 256:
        raise ValueError(f"--vocab-size {vocab_size}: must be >= 256")
    if valid_every < 2:
        raise ValueError(f"--valid-every {valid_every}: must be >= 2")
    out_dir = pathlib.Path(out)
    docs = corpus_documents(corpus)
    opts = dict(corpus=corpus, vocab_size=vocab_size, valid_every=valid_every, max_sentences=max_sentences,
                tokenizer_recipe=TOKENIZER_RECIPE)
    fp = _fingerprint(docs, opts)
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            logger.info("%s is up to date (fingerprint %s)", out_dir, fp)
            return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    # megatron-core keys its sample-index cache by paths and sizes, not by the tokens: indices built over an older
    # train.bin would be reused silently.
    shutil.rmtree(out_dir / "index_cache", ignore_errors=True)
    meta_path.unlink(missing_ok=True)
    train, valid = split(docs, valid_every)
    if not valid:
        raise ValueError(f"corpus has {len(docs)} documents: too few for --valid-every {valid_every}")

    model = train_tokenizer(train, vocab_size, max_sentences)
    _write_atomic(out_dir / "tokenizer.model", model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    _write_atomic(out_dir / "tokenizer.vocab", "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())).encode())
    eod = sp.eos_id()
    n_train = _write_indexed(out_dir / "train", train, sp, eod, "tokenise train")
    n_valid = _write_indexed(out_dir / "valid", valid, sp, eod, "tokenise valid")
    meta = dict(opts, fingerprint=fp, train_documents=len(train), valid_documents=len(valid),
                train_tokens=n_train, valid_tokens=n_valid, eod_id=eod, vocab_size_actual=sp.get_piece_size(),
                tokenizer_sha256=hashlib.sha256(model).hexdigest(), python=sys.version.split()[0])
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def sentencepiece_tokenizer(model_file: str):
    """A megatron-core tokenizer over a SentencePiece model (what GPTDatasetConfig needs: eod, pad, vocab size)."""
    import sentencepiece as spm

    with _megatron_import():
        from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

    class SentencePieceTokenizer(MegatronLegacyTokenizer):
        def __init__(self, path: str):
            super().__init__(path)
            self.sp = spm.SentencePieceProcessor(model_file=path)

        def tokenize(self, text: str) -> np.ndarray:
            return np.asarray(self.sp.encode(text), dtype=np.int64)

        def detokenize(self, ids) -> str:
            return self.sp.decode([int(i) for i in ids])

        @property
        def vocab_size(self) -> int:
            return self.sp.get_piece_size()

        @property
        def vocab(self) -> dict:
            return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

        @property
        def inv_vocab(self) -> dict:
            return {i: self.sp.id_to_piece(i) for i in range(self.vocab_size)}

        @property
        def eod(self) -> int:
            return self.sp.eos_id()

        @property
        def pad(self) -> int:
            return -1

    # The legacy base class is kept (GPTDataset's cache key reads its ``unique_identifiers``; megatron-core 0.16.1).
    # Its constructor logs a deprecation notice addressed to us, the integrators, in every process that builds a
    # dataset: that one record is dropped, the logger's other records are not.
    megatron_logger = logging.getLogger(MegatronLegacyTokenizer.__module__)
    megatron_logger.addFilter(_drop_legacy_tokenizer_notice)
    try:
        return SentencePieceTokenizer(model_file)
    finally:
        megatron_logger.removeFilter(_drop_legacy_tokenizer_notice)


def _drop_legacy_tokenizer_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("You're using the legacy tokenizer system")


def gpt_datasets(data_dir: str, seq_length: int, train_samples: int, valid_samples: int, seed: int = 1234):
    """megatron-core GPTDatasets (train, valid) over the output of :func:`prepare`.

    The sample indices are cached under ``data_dir/index_cache``: build once in one process before spawning
    workers, and the workers only memory-map them.
    """
    with _megatron_import():
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    root = pathlib.Path(data_dir)
    if not (root / "meta.json").exists():
        raise FileNotFoundError(f"{root} has no meta.json: run `python -m distlion_ds.data prepare --out {root}`")
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length,
        blend_per_split=[([str(root / "train")], None), ([str(root / "valid")], None), None],
        tokenizer=sentencepiece_tokenizer(str(root / "tokenizer.model")), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=str(root / "index_cache"))
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0], lambda: True,
                                                    cfg).build()
    return train, valid


def main(argv=None) -> int:
    # Our own progress at INFO, other libraries' INFO chatter below the threshold (their warnings still show).
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("distlion_ds", __name__):  # __name__ is "__main__" under `python -m`
        logging.getLogger(name).setLevel(logging.INFO)
    ap = argparse.ArgumentParser(prog="python -m distlion_ds.data", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="train the tokenizer and write the indexed datasets")
    p.add_argument("--corpus", default="stdlib", help="'stdlib', a folder of text files, or a .jsonl file")
    p.add_argument("--out", default="data_cache/stdlib")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--valid-every", type=int, default=50)
    p.add_argument("--max-sentences", type=int, default=300_000, help="lines sampled for tokenizer training")
    args = ap.parse_args(argv)
    meta = prepare(args.corpus, args.out, args.vocab_size, args.valid_every, args.max_sentences)
    logger.info(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
