"""Capture attention maps with hooks that are always removed: ``capture`` (the context manager) and ``adapters``
(where each model family keeps its maps); ``universal`` (with ``tracer``) finds the softmax / SDPA maps of models no
adapter knows; ``swap`` and ``intervene`` replace the map that multiplies V (attention reuse, uniform attention) or
skip blocks, through the same adapters."""
