"""Name the globals a pickle would import, without unpickling it, and the allowlist they are held against.

    names, consumed = pickle_globals(data_pkl_bytes)       # e.g. ['collections.OrderedDict', 'torch._utils...']
    bad = [n for n in names if n not in allowed_globals()]  # torch's weights_only allowlist + plain data

``PLAIN_DATA_GLOBALS`` are classes that hold only data and are allowed beyond torch's own list (``argparse.Namespace``,
which timm's train.py stores as ``args``); ``plain_data_classes`` hands them to ``torch.serialization.safe_globals``.
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}


_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


# ----------------------------------------------------------------------------------------------------- pickles
def pickle_globals(data: bytes | io.BufferedIOBase, count: int = 1) -> tuple[list[str], int]:
    """The globals (``module.name``) that unpickling ``count`` consecutive pickles would import, and bytes consumed.

    Disassembles with ``pickletools.genops``: nothing is imported or executed. ``STACK_GLOBAL`` is resolved from the
    strings pushed (or fetched from the memo) just before it; when that is impossible the name is
    ``<dynamic global>``, which no allowlist contains. Stops early at a clean end of data.
    Raises ``ValueError`` on a malformed pickle.
    """
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    found: list[str] = []
    for _ in range(count):
        start = f.tell()
        if not f.read(1):
            break
        f.seek(start)
        recent: list[object] = []  # what the last opcodes pushed (None: not a string), enough for STACK_GLOBAL
        memo: dict[int, object] = {}
        proto = 0
        for op, arg, _pos in pickletools.genops(f):
            name = op.name
            if name == "PROTO":
                proto = int(arg)
            elif name in ("GLOBAL", "INST"):
                found.append(_py3_name(*(str(arg).split(" ", 1) + [""])[:2], proto))
                recent.append(None)
            elif name == "STACK_GLOBAL":
                mod, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                ok = isinstance(mod, str) and isinstance(attr, str)
                found.append(_py3_name(mod, attr, proto) if ok else "<dynamic global>")
                recent.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                found.append(f"<copyreg extension {arg}>")
                recent.append(None)
            elif name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else None)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in _MEMO_PUT:
                memo[int(arg)] = recent[-1] if recent else None
            elif name in _MEMO_GET:
                recent.append(memo.get(int(arg)))
            elif name not in ("PROTO", "FRAME", "STOP"):
                recent.append(None)
            del recent[:-4]
    return sorted(set(found)), f.tell()


SHADOW_MAX_BYTES = 8 << 20  # the shadow pass builds the pickle's containers: only for pickles of state-dict size


class _Inert:
    """What every global resolves to in the shadow pass: accepts any call, arguments or state and runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return _Inert()

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:  # SETITEM(S) on a stand-in dict
        pass

    def __getattr__(self, name: str) -> _Inert:  # append, extend, add ... on a stand-in container
        return _Inert()


class _Shadow(pickle.Unpickler):
    """Python's own unpickler with imports switched off: ``find_class`` records the name and returns ``_Inert``.

    Every opcode is parsed by the standard implementation itself (framing, memo, protocol), so a construction that
    a disassembler reads differently cannot hide a global from the scan; nothing of the file's can run, because
    every callable the pickle can reach comes from ``find_class`` (copyreg extensions too) or is a built-in container.
    """

    def __init__(self, f: io.BufferedIOBase, found: list[str], proto: int) -> None:
        super().__init__(f)
        self.found, self.proto_seen = found, proto

    def find_class(self, module: str, name: str) -> type:
        self.found.append(_py3_name(module, name, self.proto_seen))
        return _Inert

    def persistent_load(self, pid: object) -> _Inert:
        return _Inert()


def unpickler_globals(data: bytes, count: int = 1) -> list[str]:
    """The globals the standard unpickler itself asks for while reading ``count`` consecutive pickles of ``data``
    (``_Shadow``); stops at the first error, as the real unpickler would. Empty for data over ``SHADOW_MAX_BYTES``."""
    if len(data) > SHADOW_MAX_BYTES:
        return []
    f, found = io.BytesIO(data), []
    for _ in range(count):
        start = f.tell()
        head = data[start:start + 2]
        if not head:
            break
        proto = head[1] if head[:1] == b"\x80" and len(head) == 2 else 0
        try:
            _Shadow(f, found, proto).load()
        except Exception:  # malformed for the unpickler too: the real load fails at the same point
            break
    return sorted(set(found))


def _py3_name(module: str, name: str, proto: int) -> str:
    """The global Python 3 will import: protocols < 3 map Python 2 names (``__builtin__.exec`` -> ``builtins``)."""
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


# Plain-data classes we add to torch's allowlist, by exact name, for the files researchers actually have: timm's
# train.py stores its options as ``args`` (an argparse.Namespace). Unpickling one only creates the object and sets
# attributes (no __setstate__, __reduce__ or __init__ of its own runs); its values pass the same scan as the rest.
PLAIN_DATA_GLOBALS = frozenset({"argparse.Namespace"})


def plain_data_classes() -> list[type]:
    """The classes of ``PLAIN_DATA_GLOBALS``, for ``torch.serialization.safe_globals`` around ``torch.load``."""
    import argparse

    return [argparse.Namespace]


def allowed_globals() -> set[str]:
    """Globals our scan accepts: torch's ``weights_only`` allowlist (default plus ``add_safe_globals``) and
    ``PLAIN_DATA_GLOBALS``."""
    try:
        from torch import _weights_only_unpickler as wou

        return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals()) | PLAIN_DATA_GLOBALS
    except Exception:  # private API moved: fall back to the globals torch.save emits for plain state dicts
        names = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                 "torch.Size", "torch.device", "torch._tensor._rebuild_from_type_v2"}
        return names | PLAIN_DATA_GLOBALS | {f"torch.{t}Storage" for t in ("Float", "Double", "Half", "BFloat16",
                                                                           "Long", "Int", "Short", "Char", "Byte",
                                                                           "Bool")}
