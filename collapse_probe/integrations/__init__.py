"""Collapse monitoring inside other people's training loops; each module needs its own optional dependency.

    from collapse_probe.integrations.lightning import CollapseCallback      # pip install 'collapse-probe[lightning]'
    from collapse_probe.integrations.transformers import CollapseCallback   # pip install 'collapse-probe[transformers]'

A plain loop needs no integration: ``collapse_probe.CollapseMonitor``. Both callbacks wrap one ``CollapseMonitor``
(``callback.monitor``, ``callback.history``), so they log the same numbers as every command. Nothing in the rest of
the package imports this package, and ``import collapse_probe`` imports neither Lightning nor transformers.

Under DDP only rank 0 measures, with a plain forward of its own replica: models whose forward needs every rank
(FSDP, DeepSpeed ZeRO-3, tensor parallelism) are not supported.
"""
