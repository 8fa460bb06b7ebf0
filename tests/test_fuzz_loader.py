"""Property-based tests of the checkpoint loader: random and mutated files never escape as anything but our errors.

    pytest tests/test_fuzz_loader.py -q

For random bytes (bare or behind each format's magic) and for valid safetensors / torch zip / legacy torch files
mutated by byte flips, truncation, insertion and deletion, ``read_checkpoint`` either returns a checkpoint or raises a
``CollapseProbeError`` subclass; any other exception, a hang (hypothesis deadline, pytest-timeout) or a payload
running fails the test. Whatever our safetensors validator accepts, the safetensors library must load.
"""
from __future__ import annotations

import atexit
import io
import math
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collapse_probe.errors import CollapseProbeError, MalformedFileError
from collapse_probe.loading import safety
from collapse_probe.loading.read import read_checkpoint

from . import hostile

FUZZ = settings(max_examples=300, deadline=timedelta(seconds=10), database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORK = Path(tempfile.mkdtemp(prefix="collapse_probe_fuzz_"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
SENTINEL = WORK / "sentinel"
SENTINEL.mkdir()


def _legacy() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


SEEDS = {
    "safetensors": hostile.safetensors_bytes(*hostile.good_safetensors()),
    "torch-zip": hostile.torch_zip_bytes(),
    "torch-legacy": _legacy(),
    # a payload archive: mutations must never turn refusal into execution
    "payload-zip": hostile.rewrite_zip(hostile.torch_zip_bytes(), {
        "/data.pkl": hostile.dumps(hostile.payloads(SENTINEL)["os_system"])}),
}


def _load(data: bytes) -> None:
    path = WORK / "f.bin"
    path.write_bytes(data)
    try:
        read_checkpoint(path)
    except CollapseProbeError:
        pass
    assert list(SENTINEL.iterdir()) == [], "a payload ran"


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
    st.tuples(st.just("int32"), st.integers(0, 1 << 20), st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 20])),
)


def mutate(data: bytes, ops: list) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in ops:
        if not b:
            break
        pos %= len(b)
        if kind == "flip":
            b[pos] ^= arg
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = arg
        elif kind == "delete":
            del b[pos:pos + arg]
        else:  # overwrite a little-endian size/offset field: the absurd-size cases
            b[pos:pos + 4] = struct.pack("<I", arg)
    return bytes(b)


@pytest.mark.timeout(300)
@FUZZ
@given(prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04", struct.pack("<Q", 40) + b"{"]),
       body=st.binary(max_size=4096))
def test_random_bytes(prefix: bytes, body: bytes) -> None:
    _load(prefix + body)


@pytest.mark.timeout(300)
@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_valid_files(seed: str, ops: list) -> None:
    _load(mutate(SEEDS[seed], ops))


@pytest.mark.timeout(300)
@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_safetensors_validator_never_lets_library_fail(ops: list) -> None:
    """Parity with the safetensors library: a file our validator accepts, the library loads."""
    from safetensors.torch import load_file

    path = WORK / "m.safetensors"
    path.write_bytes(mutate(SEEDS["safetensors"], ops))
    try:
        safety.check_safetensors(path)
    except MalformedFileError:
        return
    load_file(str(path))


@pytest.mark.timeout(300)
@FUZZ
@given(data=st.binary(max_size=2048))
def test_pickle_scanner_raises_only_value_errors(data: bytes) -> None:
    """The static scan is total: names or a clean parse error, never anything else, never execution."""
    try:
        names, used = safety.pickle_globals(data, count=5)
    except ValueError:
        return
    assert 0 <= used <= len(data) and all(isinstance(n, str) for n in names)


DTYPES = sorted(safety.SAFETENSORS_DTYPES)


@pytest.mark.timeout(300)
@FUZZ
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)), max_size=4),
       perturb=st.one_of(st.none(), st.tuples(st.integers(0, 3), st.sampled_from(["start", "end", "dtype", "shape"]),
                                              st.integers(-9, 9))),
       extra=st.sampled_from([0, 0, 0, 1, 8, -1]))
def test_structured_safetensors_headers(specs: list, perturb: tuple | None, extra: int) -> None:
    """Consistent headers over every dtype and shape (empty tensors, scalars), then at most one defect (an offset
    moved, a dtype or shape changed, the buffer a little long or short): whenever our validator accepts, the
    safetensors library loads the same names and shapes; the loader raises only our errors."""
    from safetensors.torch import load_file

    entries, pos = {}, 0
    for i, (dtype, shape) in enumerate(specs):
        n = safety.SAFETENSORS_DTYPES[dtype] * (1 if not shape else math.prod(shape))
        entries[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    if perturb is not None and entries:
        i, what, delta = perturb
        e = entries[f"t{i % len(entries)}"]
        if what in ("start", "end"):
            e["data_offsets"][what == "end"] += delta
        elif what == "dtype":
            e["dtype"] = DTYPES[(DTYPES.index(e["dtype"]) + delta) % len(DTYPES)]
        else:
            e["shape"] = e["shape"] + [abs(delta)]
    path = WORK / "h.safetensors"
    path.write_bytes(hostile.safetensors_bytes(entries, bytes(max(0, pos + extra))))
    try:
        safety.check_safetensors(path)
    except MalformedFileError:
        assert perturb is not None or extra != 0  # a consistent header is never rejected
        _load(path.read_bytes())
        return
    loaded = load_file(str(path))
    assert {k: list(t.shape) for k, t in loaded.items()} == {k: e["shape"] for k, e in entries.items()}
    _load(path.read_bytes())
