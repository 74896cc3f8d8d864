"""Megatron-LM plugin: D-Lion, compressed pipeline p2p and compressed tied embeddings inside Megatron-LM's ``pretrain``.

Two calls in Megatron-LM's ``pretrain_gpt.py`` (issue 11, item 4)::

    import distlion_ds.megatron as dlm
    dlm.install_megatron_lm()
    pretrain(..., extra_args_provider=dlm.add_arguments)

Flags (:func:`add_arguments`). Megatron-LM's own ``--optimizer`` keeps its choices: its
``get_megatron_optimizer_config`` accepts only adam / sgd (/ muon) and builds the ``OptimizerConfig`` our optimizer
reads, so D-Lion is a separate switch and ``--optimizer`` stays ``adam`` (the default):

- ``--distlion``: train with Distributed Lion (1-bit votes over data parallelism). Megatron-LM's ``--lr``,
  ``--min-lr``, ``--weight-decay``, ``--clip-grad`` and its lr schedule apply (through ``OptimizerConfig``);
- ``--dlion-aggregation mavo|avg``, ``--dlion-beta1``, ``--dlion-beta2`` (Lion's betas, default 0.9 / 0.99: they
  replace ``--adam-beta1/2`` in the config D-Lion gets), ``--dlion-local-steps H`` (local-step D-Lion, default 1 =
  a vote every step);
- ``--p2p-compression FILE|JSON``: compress pipeline activations / gradients (DESIGN 3.3 compression config);
- ``--tied-embedding-compression FILE|JSON``: compress the tied word-embedding gradient all-reduce between the first
  and last stage (one codec section, see :func:`distlion_ds.megatron.tied.tied_embedding_config`).

Every value is validated when parsed (argparse names the flag); combinations that cannot work are refused by
:func:`validate_args` before the optimizer is built, naming the flags.

:func:`install_megatron_lm` (opt-in, idempotent through a marker attribute, logged once, originals kept for
:func:`uninstall_megatron_lm`) rebinds four module globals of ``megatron.training.training``, the names Megatron-LM's
loop calls them by (core_v0.16.1 and core_v0.19.0; tests/test_megatron_plugin.py pins the signatures):

- ``DDP``, the class ``get_model`` wraps each model chunk with (``DDP(config=..., ddp_config=..., module=...,
  disable_bucketing=...)``) and ``train()`` tests with ``isinstance``: with ``--distlion`` a subclass builds the
  chunks with :func:`distlion_ds.megatron.optimizer.ddp_config_for_dlion` applied to Megatron-LM's DDP config
  (``use_distributed_optimizer=True`` for 64-element-aligned parameters in contiguous buffers, no parameter
  all-gather; D-Lion's bucket path needs that layout, and nothing is sharded), otherwise megatron-core's class as is;
- ``get_megatron_optimizer``, called by ``setup_model_and_optimizer`` as
  ``get_megatron_optimizer(config, model, config_overrides=..., use_gloo_process_groups=..., ...)``: with
  ``--distlion`` it builds ``distlion_ds.megatron.get_optimizer(config, model, aggregation=...)``, otherwise it calls
  megatron-core's own;
- ``finalize_model_grads``, which ``train()`` puts in ``config.finalize_model_grads_func``: with
  ``--tied-embedding-compression`` it is :class:`~distlion_ds.megatron.tied.CompressedFinalizeModelGrads` over
  megatron-core's own function (every other step unchanged), otherwise megatron-core's function;
- ``get_forward_backward_func``, called by ``train()`` and ``evaluate()``: with ``--p2p-compression`` it first makes
  the schedules build :class:`~distlion_ds.megatron.CompressedP2PCommunicator` (``distlion_ds.megatron.install``;
  Megatron-LM's ``train_step`` passes no ``p2p_communicator``), then returns megatron-core's function.

The wrappers read Megatron-LM's parsed arguments at call time (``get_args()``), so installing before ``pretrain``
parses them is right; without any of our flags each wrapper calls the original unchanged.

The EF residual of the tied-embedding compression lives in :func:`tied_embedding_state` for the whole run; with
``--ckpt-format torch_dist`` Megatron-LM's checkpoint carries it (the optimizer's ``sharded_state_dict`` /
``load_state_dict`` add and take it, one object per rank; tested as a save -> load round trip of model and optimizer,
not as a full Megatron-LM resume). The legacy ``torch`` checkpoint format does not carry it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import inspect
import logging
import math
from typing import Any

from distlion_ds.compress import CompressionConfig

from .tied import SHARDED_KEY, CompressedFinalizeModelGrads, TiedEmbeddingState, tied_embedding_config

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "build_distlion_optimizer", "dlion_ddp_config", "install_megatron_lm",
           "is_megatron_lm_installed", "plugin_comm_stats", "tied_embedding_state", "uninstall_megatron_lm",
           "validate_args"]

_MARKER = "_distlion_megatron_lm_originals"
_PATCHED = ("DDP", "get_megatron_optimizer", "finalize_model_grads", "get_forward_backward_func")
_DEFAULTS = {"dlion_aggregation": "mavo", "dlion_beta1": 0.9, "dlion_beta2": 0.99, "dlion_local_steps": 1}
_TIED_STATE = TiedEmbeddingState()


# --------------------------------------------------------------------------------------------------------- flags


def _beta(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a value in [0, 1)") from None
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; {flag} must be in [0, 1)")
        return value

    return parse


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; {flag} takes an integer >= 1") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} is out of range; {flag} takes an integer >= 1")
        return value

    return parse


def _config_checker(flag: str, check):
    # The namespace keeps the string as given (a path or a JSON document): Megatron-LM stores its args in every
    # checkpoint, and a plain string survives any loader; the wrappers re-read it (cheap, validated here already).
    def parse(text: str) -> str:
        try:
            check(text, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse


def _check_p2p(text: str, flag: str) -> None:
    CompressionConfig.from_json(text, key=flag)


def _check_tied(text: str, flag: str) -> None:
    tied_embedding_config(text, key=flag)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the distlion_ds flags; use as ``pretrain(..., extra_args_provider=add_arguments)``.

    Args:
        parser: Megatron-LM's argument parser (or any ``argparse.ArgumentParser``).

    Returns:
        The same parser (Megatron-LM's ``parse_args`` uses the returned one).
    """
    g = parser.add_argument_group(title="distlion_ds", description="Distributed Lion and compressed communication "
                                  "(the flags keep Megatron-LM's --optimizer choices: D-Lion is --distlion).")
    g.add_argument("--distlion", action="store_true",
                   help="Train with Distributed Lion: 1-bit votes over data parallelism instead of the gradient "
                        "all-reduce. Keep --optimizer adam (the default): its --lr, --min-lr, --weight-decay and "
                        "--clip-grad feed D-Lion.")
    g.add_argument("--dlion-aggregation", choices=("mavo", "avg"), default=_DEFAULTS["dlion_aggregation"],
                   help="How votes are aggregated: majority vote (mavo) or the average (avg).")
    g.add_argument("--dlion-beta1", type=_beta("--dlion-beta1"), default=_DEFAULTS["dlion_beta1"],
                   help="Lion beta1 (interpolation for the vote); replaces --adam-beta1 for D-Lion.")
    g.add_argument("--dlion-beta2", type=_beta("--dlion-beta2"), default=_DEFAULTS["dlion_beta2"],
                   help="Lion beta2 (momentum decay); replaces --adam-beta2 for D-Lion.")
    g.add_argument("--dlion-local-steps", type=_positive_int("--dlion-local-steps"),
                   default=_DEFAULTS["dlion_local_steps"],
                   help="Local-step D-Lion: exchange votes every H steps (1: every step).")
    g.add_argument("--p2p-compression", type=_config_checker("--p2p-compression", _check_p2p), default=None,
                   metavar="FILE|JSON", help="Compression config for pipeline activations / gradients "
                                             "(e.g. configs/compression/topk10_q8.json).")
    g.add_argument("--tied-embedding-compression", type=_config_checker("--tied-embedding-compression", _check_tied),
                   default=None, metavar="FILE|JSON",
                   help='Codec for the tied word-embedding gradient all-reduce between first and last stage, e.g. '
                        '\'{"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"}\'.')
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot work, naming the flags (called before the optimizer is built).

    Args:
        args: Megatron-LM's parsed arguments (with :func:`add_arguments`' flags).

    Raises:
        ValueError: one message listing every problem with the flags involved and the fix.
    """
    problems = []
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if getattr(args, "distlion", False):
        optimizer = getattr(args, "optimizer", "adam")
        if optimizer != "adam":
            problems.append(f"--distlion needs --optimizer adam (Megatron-LM's default, whose config carries --lr, "
                            f"--weight-decay and --clip-grad to D-Lion), got --optimizer {optimizer}")
        if getattr(args, "use_distributed_optimizer", False):
            problems.append("--distlion with --use-distributed-optimizer: D-Lion keeps each rank's own momentum and "
                            "never reduce-scatters gradients; drop --use-distributed-optimizer")
    else:
        for name, default in _DEFAULTS.items():
            value = getattr(args, name, default)
            if value != default:
                flag = "--" + name.replace("_", "-")
                problems.append(f"{flag} {value} has no effect without --distlion; add --distlion or drop {flag}")
    if getattr(args, "p2p_compression", None) is not None and pp < 2:
        problems.append("--p2p-compression needs pipeline parallelism (--pipeline-model-parallel-size >= 2), "
                        f"got {pp}")
    if getattr(args, "tied_embedding_compression", None) is not None:
        if getattr(args, "untie_embeddings_and_output_weights", False):
            problems.append("--tied-embedding-compression with --untie-embeddings-and-output-weights: there is no "
                            "tied embedding to compress; drop one of them")
        if pp < 2:
            problems.append("--tied-embedding-compression needs --pipeline-model-parallel-size >= 2 (with one stage "
                            f"the embedding has one copy), got {pp}")
    if problems:
        raise ValueError("distlion_ds flags: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------ the wrappers


def _training():
    try:
        return importlib.import_module("megatron.training.training")
    except ImportError as e:
        raise ImportError(
            "install_megatron_lm() plugs into Megatron-LM's megatron.training, which is not importable here (the "
            "megatron-core wheel does not ship it): run from a Megatron-LM checkout (e.g. PYTHONPATH=<Megatron-LM>), "
            "or use distlion_ds.megatron.get_optimizer / install / finalize_model_grads_with directly"
        ) from e


def _optimizer_factory():
    try:
        from .optimizer import get_optimizer
    except ImportError as e:
        raise ImportError("--distlion: distlion_ds.megatron.optimizer (D-Lion as a MegatronOptimizer) is not "
                          f"importable in this installation: {e}") from e
    return get_optimizer


def build_distlion_optimizer(args: argparse.Namespace, config, model_chunks, **kwargs):
    """``distlion_ds.megatron.get_optimizer`` from Megatron-LM's args and ``OptimizerConfig`` (the --distlion path).

    Args:
        args: Megatron-LM's parsed arguments.
        config: the ``OptimizerConfig`` Megatron-LM built (lr, min_lr, weight_decay, clip_grad, ...).
        model_chunks: the DDP-wrapped model chunks.
        **kwargs: what Megatron-LM passed to ``get_megatron_optimizer`` beyond those two; forwarded where
            ``get_optimizer`` names a parameter of that name (``config_overrides``, ``pg_collection``, ...).

    Returns:
        The D-Lion ``MegatronOptimizer``.
    """
    get_optimizer = _optimizer_factory()
    accepted = inspect.signature(get_optimizer).parameters
    config = dataclasses.replace(config, adam_beta1=args.dlion_beta1, adam_beta2=args.dlion_beta2)
    extra = {k: v for k, v in kwargs.items() if k in accepted and k not in ("config", "model_chunks")}
    if args.dlion_local_steps != 1:
        if "local_steps" not in accepted:
            raise ValueError(f"--dlion-local-steps {args.dlion_local_steps}: this distlion_ds's Megatron optimizer "
                             "has no local-step mode (get_optimizer takes no local_steps); use --dlion-local-steps 1")
        extra["local_steps"] = args.dlion_local_steps
    logger.info("distlion_ds: building D-Lion (aggregation=%s, betas=(%s, %s), local steps %d)",
                args.dlion_aggregation, args.dlion_beta1, args.dlion_beta2, args.dlion_local_steps)
    return get_optimizer(config, model_chunks, aggregation=args.dlion_aggregation, **extra)


_VALIDATED: set[int] = set()


def _checked_args(training) -> argparse.Namespace:
    """Megatron-LM's args, validated once per namespace by whichever wrapper runs first (Megatron-LM builds the
    optimizer through get_megatron_muon_optimizer for muon, so get_megatron_optimizer alone would miss
    ``--distlion --optimizer muon``; train() fetches the schedules either way)."""
    args = training.get_args()
    if id(args) not in _VALIDATED:
        validate_args(args)
        _VALIDATED.add(id(args))
    return args


class _GetMegatronOptimizer:
    """Megatron-LM's ``get_megatron_optimizer`` name: D-Lion with --distlion, else megatron-core's own."""

    def __init__(self, original, training):
        self.original, self.training = original, training

    def __call__(self, config, model_chunks, *args, **kwargs):
        margs = _checked_args(self.training)
        if not getattr(margs, "distlion", False):
            optimizer = self.original(config, model_chunks, *args, **kwargs)
        elif args:
            raise TypeError("get_megatron_optimizer wrapper: Megatron-LM passes its options by keyword; got "
                            f"{len(args)} extra positional argument(s)")
        else:
            optimizer = build_distlion_optimizer(margs, config, model_chunks, **kwargs)
        if getattr(margs, "tied_embedding_compression", None) is not None:
            _carry_tied_state(optimizer)
        return optimizer


def _carry_tied_state(optimizer) -> None:
    """Make the optimizer's checkpoint carry the tied-embedding EF state (``--ckpt-format torch_dist``).

    Megatron-LM saves ``optimizer.sharded_state_dict(...)`` with ``dist_checkpointing`` and, after loading, hands the
    result to ``optimizer.load_state_dict``; this instance's two methods add / take one per-rank ``ShardedObject``
    (:meth:`TiedEmbeddingState.sharded_state_dict`), so a resumed run continues the residuals and the seeds exactly.
    Loading a checkpoint saved without ``--tied-embedding-compression`` then fails in ``dist_checkpointing`` on the
    missing key (add the flag only to a fresh run). The legacy ``torch`` format does not carry it.
    """
    original_sharded, original_load = optimizer.sharded_state_dict, optimizer.load_state_dict

    def sharded_state_dict(model_sharded_state_dict, is_loading=False, **kwargs):
        out = original_sharded(model_sharded_state_dict, is_loading, **kwargs)
        out[SHARDED_KEY] = tied_embedding_state().sharded_state_dict()
        return out

    def load_state_dict(state_dict):
        if isinstance(state_dict, dict) and SHARDED_KEY in state_dict:
            state_dict = dict(state_dict)
            tied_embedding_state().load_state_dict(state_dict.pop(SHARDED_KEY))
        return original_load(state_dict)

    optimizer.sharded_state_dict = sharded_state_dict
    optimizer.load_state_dict = load_state_dict


class _FinalizeModelGrads:
    """Megatron-LM's ``finalize_model_grads`` name: the compressed tied-embedding step with the flag, else the
    original."""

    def __init__(self, original, training):
        self.original, self.training = original, training
        self._compressed: dict[str, CompressedFinalizeModelGrads] = {}

    def __call__(self, model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        spec = getattr(_checked_args(self.training), "tied_embedding_compression", None)
        fn = self.original if spec is None else self.compressed(spec)
        return fn(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

    def compressed(self, spec: str) -> CompressedFinalizeModelGrads:
        fn = self._compressed.get(spec)
        if fn is None:
            fn = CompressedFinalizeModelGrads(tied_embedding_config(spec, key="--tied-embedding-compression"),
                                              state=_TIED_STATE, finalize=self.original)
            self._compressed[spec] = fn
            logger.info("distlion_ds: tied-embedding gradient all-reduce compressed with %s",
                        fn.compressor.config.model_dump())
        return fn

    def comm_stats(self) -> dict[str, Any]:
        """Bytes of the compressed tied-embedding channel so far (zeros when it never ran)."""
        fns = list(self._compressed.values())
        return fns[-1].comm_stats() if fns else {"bytes_sent": 0, "bytes_received": 0}


class _GetForwardBackwardFunc:
    """Megatron-LM's ``get_forward_backward_func`` name: installs the compressed communicator first when asked."""

    def __init__(self, original, training):
        self.original, self.training = original, training

    def __call__(self, *args, **kwargs):
        spec = getattr(_checked_args(self.training), "p2p_compression", None)
        if spec is not None:
            from .install import install

            install(CompressionConfig.from_json(spec, key="--p2p-compression"))
        return self.original(*args, **kwargs)


def dlion_ddp_config(ddp_config):
    """Megatron-LM's ``DistributedDataParallelConfig`` with the fields D-Lion's bucket path needs
    (``distlion_ds.megatron.optimizer.ddp_config_for_dlion``); every other field as Megatron-LM set it.

    Args:
        ddp_config: the config Megatron-LM's ``get_model`` built from its flags.

    Returns:
        A new config.
    """
    try:
        from .optimizer import ddp_config_for_dlion
    except ImportError as e:
        raise ImportError(f"--distlion: distlion_ds.megatron.optimizer is not importable in this installation: {e}") \
            from e
    forced = ("use_distributed_optimizer", "overlap_param_gather")  # what ddp_config_for_dlion sets
    keep = {f.name: getattr(ddp_config, f.name) for f in dataclasses.fields(ddp_config)
            if f.init and f.name not in forced}
    return ddp_config_for_dlion(**keep)


def _ddp_class(original, training):
    class DistributedDataParallel(original):
        """Megatron-LM's ``DDP`` name: megatron-core's class, built with D-Lion's DDP config under --distlion."""

        def __init__(self, config, ddp_config, module, *args, **kwargs):
            if getattr(_checked_args(training), "distlion", False):
                ddp_config = dlion_ddp_config(ddp_config)
            super().__init__(config, ddp_config, module, *args, **kwargs)

    DistributedDataParallel.original = original
    DistributedDataParallel.__qualname__ = f"distlion_ds.{original.__name__}"
    return DistributedDataParallel


_WRAPPERS = {"DDP": _ddp_class, "get_megatron_optimizer": _GetMegatronOptimizer,
             "finalize_model_grads": _FinalizeModelGrads, "get_forward_backward_func": _GetForwardBackwardFunc}


def install_megatron_lm() -> bool:
    """Make Megatron-LM's training loop build D-Lion, compressed p2p and compressed tied embeddings when flagged.

    Opt-in and idempotent (a marker attribute on ``megatron.training.training``), logged once; the originals are kept
    for :func:`uninstall_megatron_lm`. Without our flags every wrapped name behaves as Megatron-LM's own.

    Returns:
        True when it installed now, False when it was installed already.

    Raises:
        ImportError: ``megatron.training`` is not importable (the megatron-core wheel alone).
        RuntimeError: a name the plugin wraps is missing from ``megatron.training.training``.
    """
    training = _training()
    if getattr(training, _MARKER, None) is not None:
        return False
    missing = [n for n in (*_PATCHED, "get_args") if not callable(getattr(training, n, None))]
    if missing:
        raise RuntimeError(f"install_megatron_lm(): megatron.training.training has no {', '.join(missing)}; this "
                           "plugin follows Megatron-LM core_v0.16.1 - core_v0.19.0")
    originals = {name: getattr(training, name) for name in _PATCHED}
    for name, wrapper in _WRAPPERS.items():
        setattr(training, name, wrapper(originals[name], training))
    setattr(training, _MARKER, originals)
    logger.info("distlion_ds: Megatron-LM plugin installed (DDP, get_megatron_optimizer, finalize_model_grads, "
                "get_forward_backward_func of megatron.training.training); active only with its flags")
    return True


def uninstall_megatron_lm() -> None:
    """Restore Megatron-LM's own names and megatron-core's default communicator, and drop the tied-embedding EF
    state; no-op when not installed."""
    global _TIED_STATE
    training = importlib.import_module("megatron.training.training")
    originals = getattr(training, _MARKER, None)
    if originals is None:
        return
    _TIED_STATE = TiedEmbeddingState()  # the residuals belonged to the installed run
    for name, fn in originals.items():
        setattr(training, name, fn)
    setattr(training, _MARKER, None)
    from .install import uninstall

    uninstall()
    logger.info("distlion_ds: Megatron-LM plugin uninstalled")


def is_megatron_lm_installed() -> bool:
    """Whether :func:`install_megatron_lm` is in effect."""
    try:
        training = importlib.import_module("megatron.training.training")
    except ImportError:
        return False
    return getattr(training, _MARKER, None) is not None


def tied_embedding_state() -> TiedEmbeddingState:
    """The plugin's tied-embedding EF state (this rank's residual and counters) for the whole run.

    Returns:
        The state; ``state_dict()`` / ``load_state_dict()`` carry it through your own checkpoint.
    """
    return _TIED_STATE


def plugin_comm_stats() -> dict[str, Any]:
    """Bytes of the plugin's compressed channels so far on this rank: ``{"tied_embedding": ..., "p2p": ...}``."""
    out: dict[str, Any] = {}
    try:
        training = importlib.import_module("megatron.training.training")
    except ImportError:
        return out
    fin = training.finalize_model_grads
    if isinstance(fin, _FinalizeModelGrads):
        out["tied_embedding"] = fin.comm_stats()
    from megatron.core.pipeline_parallel import schedules

    from .install import is_installed

    if is_installed():  # the installed communicator class holds the state (and byte counts) its instances share
        out["p2p"] = copy.deepcopy(schedules.P2PCommunicator.shared_state.stats)
    return out
