"""Config files and ``--set`` values, read within bounds: the layers ``train.cli`` merges over a preset.

    overrides = load_config_file("recipe.yaml")          # TrainConfig keys; YAML (or JSON), aliases bounded
    key, value = parse_override("model_args.depth=16")   # ("model_args", {"depth": 16})

A YAML file is small but its aliases can stand for an exponential amount of data (the "billion laughs": 527 bytes
that expand to gigabytes once anything copies or prints the value), and an anchor can contain itself. The loader
measures the composed document with every alias expanded, and refuses a recursive alias or more than
``MAX_NODES`` values, before any Python object is built. Files over ``MAX_BYTES`` and deeper nesting than the parser's
recursion allows are refused too; each case is one line, exit 2.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import BadArgumentError, first_line
from .config import TrainConfig

MAX_BYTES = 1 << 20  # a recipe is a few hundred bytes
MAX_NODES = 100_000  # scalars, sequences and mappings of the document, every alias expanded


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def expanded_size(node: Any, where: str) -> int:
    """How many nodes ``node`` stands for with every alias expanded; BadArgumentError past ``MAX_NODES`` or for an
    alias inside its own anchor. Linear in the distinct nodes (each subtree's size is computed once)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # nodes whose subtree is being measured: meeting one again is a cycle
    stack: list[tuple[Any, bool]] = [(node, False)]
    while stack:
        n, done = stack.pop()
        if done:
            open_.discard(id(n))
            sizes[id(n)] = 1 + sum(sizes[id(c)] for c in _children(n))
            if sizes[id(n)] > MAX_NODES:
                raise BadArgumentError(f"{where} expands to more than {MAX_NODES:,} values (YAML aliases repeat data "
                                       "exponentially); write the values out or use fewer aliases")
            continue
        if id(n) in sizes:
            continue
        if id(n) in open_:
            raise BadArgumentError(f"{where} has a recursive YAML alias (an anchor that contains itself)")
        open_.add(id(n))
        stack.append((n, True))
        for c in _children(n):
            if id(c) in open_:
                raise BadArgumentError(f"{where} has a recursive YAML alias (an anchor that contains itself)")
            if id(c) not in sizes:
                stack.append((c, False))
    return sizes[id(node)]


def _bounded_loader(where: str) -> type:
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that measures the composed document before constructing anything from it."""

        def compose_document(self):  # noqa: ANN201  (yaml's signature)
            node = super().compose_document()
            if node is not None:
                expanded_size(node, where)
            return node

    return BoundedLoader


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` with aliases bounded (see the module docstring); errors name ``where``."""
    import yaml

    try:
        return yaml.load(text, Loader=_bounded_loader(where))  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise BadArgumentError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or first_line(e)}") from e
    except RecursionError as e:
        raise BadArgumentError(f"{where} is nested too deeply to read") from e


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Keys of TrainConfig from a YAML (or JSON) file; unknown keys here, bad types and ranges in ``resolve_config``."""
    path = Path(path)
    where = f"--config {path}"
    try:
        if not path.is_file():  # a FIFO or device would block the read
            raise BadArgumentError(f"{where} is not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise BadArgumentError(f"cannot read {where}: {e.strerror or type(e).__name__}") from e
    if len(raw) > MAX_BYTES:
        raise BadArgumentError(f"{where} is over {MAX_BYTES >> 20} MiB; a training recipe needs a few hundred bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadArgumentError(f"{where} is not UTF-8 text ({first_line(e)})") from e
    data = load_yaml(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise BadArgumentError(f"{where} must be a mapping of config keys, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise BadArgumentError(f"{where}: unknown key(s) {', '.join(unknown)[:200]} (see --print-config for the "
                               "valid keys)")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; VALUE is parsed as JSON when it can be (numbers, lists, null, true). A
    dotted KEY sets one entry of a mapping: ``model_args.depth=16`` gives ``("model_args", {"depth": 16})``."""
    if "=" not in text:
        raise BadArgumentError(f"--set expects KEY=VALUE, got '{text[:80]}'")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError as e:
        raise BadArgumentError(f"--set {key.strip()}: the value is nested too deeply") from e
    parts = [p.strip().replace("-", "_") if i == 0 else p.strip() for i, p in enumerate(key.split("."))]
    if not all(parts):
        raise BadArgumentError(f"--set expects KEY=VALUE or KEY.SUBKEY=VALUE, got '{text[:80]}'")
    for part in reversed(parts[1:]):
        value = {part: value}
    return parts[0], value
