"""deepspeed layer of distlion_ds (see DESIGN section 2): the DeepSpeed seam.

- :mod:`.config`: the ``"optimizer": {"type": "DistributedLion"}`` section and what D-Lion refuses (no deepspeed
  import, so configs can be checked anywhere);
- :mod:`.engine`: ``initialize`` (exposed as ``distlion_ds.initialize``), local gradient clipping, the adapter
  DeepSpeed steps;
- :mod:`.checkpoint`: every data-parallel rank's momentum in ``engine.save_checkpoint`` / ``load_checkpoint``.

Importing this package imports nothing from DeepSpeed; ``.engine`` and ``.checkpoint`` do.
"""
