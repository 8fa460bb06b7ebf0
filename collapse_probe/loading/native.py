"""File names for readers written in other languages: any name the OS accepts, also one that is not UTF-8.

    with native_name(path) as name:            # str that safetensors' Rust reader (UTF-8 only) can open
        with safe_open(name, framework="pt") as f: ...

Linux file names are bytes; Python carries undecodable bytes as surrogates (``os.fsdecode``), which Rust and C++
readers refuse ("not valid UTF-8"). Such a file is opened here by Python and handed over as ``/proc/self/fd/N``, the
same file under a name that is plain ASCII; the message for a system without /proc says what is wrong with the name.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import BadArgumentError, printable


def is_utf8(name: str) -> bool:
    """Whether ``name`` is valid UTF-8 as the OS has it (no undecodable bytes carried as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def native_name(path: str | Path) -> Iterator[str]:
    """``str(path)`` when it is UTF-8, else a /proc/self/fd name of the same file, open while the block runs."""
    name = str(path)
    if is_utf8(name):
        yield name
        return
    fd = os.open(os.fsencode(name), os.O_RDONLY)
    try:
        alias = f"/proc/self/fd/{fd}"
        if not os.path.exists(alias):
            raise BadArgumentError(f"{printable(name)}: its name is not valid UTF-8, which the safetensors reader "
                                   "cannot open on this system; rename the file")
        yield alias
    finally:
        os.close(fd)
