"""Capture attention maps with hooks that are always removed: ``capture`` (the context manager) and ``adapters``
(where each model family keeps its maps)."""
