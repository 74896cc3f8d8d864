"""The pieces of ``python -m distlion_ds.megatron.pretrain_gpt``, one job per module.

``arguments`` (Megatron-LM flag names, the parallel layout), ``model`` (GPTModel chunks in megatron-core's DDP),
``optimizer`` (D-Lion through :func:`distlion_ds.megatron.get_optimizer`, or megatron-core's own
``get_megatron_optimizer``; the LR schedule), ``local_steps`` (``--dlion-local-steps H``: megatron-core's AdamW
inside, 1-bit D-Lion outside), ``data`` (micro-batches and the loss), ``checkpointing``
(``dist_checkpointing`` with a tracker written last), ``summary`` (wire bytes per channel, replica checks,
``summary.json``). The modules import megatron-core where they use it.
"""
