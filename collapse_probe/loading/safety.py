"""Inspect checkpoint files before any deserialiser touches them: nothing here executes or decompresses content.

    from collapse_probe.loading.safety import check_torch_file, check_safetensors
    check_safetensors(Path("model.safetensors"))            # header, dtypes, offsets; raises MalformedFileError
    check_torch_file(Path("model.pt"), "torch-zip", trust_pickle=False)   # zip layout, pickle globals, torch version

What is checked (see SECURITY.md for the guarantees this gives):

* torch zip archives (``torch.save`` since 1.6): a single end-of-central-directory record at the end of the file, every
  entry STORED (torch never compresses; a compressed entry is how decompression bombs are built), declared sizes
  consistent with the archive, entries that neither overlap nor run past the end, local headers that agree with the
  central directory (so Python's zip reader and torch's miniz cannot see different files), no TorchScript
  (``code/``, ``constants.pkl``), a ``data.pkl`` of at most ``max_pickle_bytes``;
* legacy torch pickles (``_use_new_zipfile_serialization=False``): the leading pickles are size-capped the same way;
* legacy torch tar archives (torch < 0.4): always refused;
* every pickle is disassembled with ``pickletools`` (never unpickled; ``loading.pickles``) and the globals it would
  import are named; any
  global outside torch's ``weights_only`` allowlist is refused unless the user passed ``--trust-pickle``;
* pickle-based files are refused under torch < 2.6, whose ``weights_only=True`` loader has a known bypass
  (CVE-2025-32434), again unless the user trusts the file;
* safetensors: header length, UTF-8 JSON object, known dtypes, shapes, offsets (inside the buffer, sized by
  shape x dtype, no overlap, no gap, covering the whole buffer) -- validated here so every defect is one clean line;
* model config stored in a file (``check_model_args``): it may not steer timm's factory (``checkpoint_path`` would make
  timm read another file, ``pretrained*`` / ``cache_dir`` a download) and its numbers must be of the order of the
  weights actually present (``depth=10**9`` would otherwise build for hours before any shape check).

The pickle cap is ``MAX_PICKLE_BYTES`` (64 MiB), or ``COLLAPSE_PROBE_MAX_PICKLE_MB`` in the environment.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import MalformedFileError, RefusedContentError, UnsupportedLayoutError, one_line
from .pickles import PLAIN_DATA_GLOBALS, allowed_globals, pickle_globals, plain_data_classes, unpickler_globals  # noqa: F401  (API)

MAX_PICKLE_BYTES = 64 << 20  # a state dict's data.pkl is keys + tensor stubs; tensors live in separate entries


MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE, decimal bytes)


MAX_DEPTH = 1024  # blocks a stored config may ask for (the paper's deepest model has 32)


MIN_SAFE_TORCH = (2, 6)  # torch <= 2.5.1: torch.load(weights_only=True) can be bypassed (CVE-2025-32434)


LEGACY_PICKLES = 5  # legacy torch files: magic number, protocol, sys info, object, storage keys; raw bytes follow


# safetensors dtype -> bytes per element (the dtypes the safetensors format defines and torch can hold)
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


def max_pickle_bytes() -> int:
    """The pickle size cap in bytes: ``COLLAPSE_PROBE_MAX_PICKLE_MB`` if set, else ``MAX_PICKLE_BYTES``."""
    env = os.environ.get("COLLAPSE_PROBE_MAX_PICKLE_MB")
    if env:
        try:
            return max(1, int(float(env) * (1 << 20)))
        except ValueError:
            pass  # an unreadable setting must not weaken the default
    return MAX_PICKLE_BYTES


def _refuse_globals(path: Path, names: list[str], trust_pickle: bool) -> None:
    bad = [n for n in names if n not in allowed_globals()]
    if bad and not trust_pickle:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise RefusedContentError(
            f"refused {path}: unpickling it would import {shown}, which can run code; convert it to safetensors, "
            "or pass --trust-pickle for this run only if you trust its author")


def torch_version_ok(version: str | None = None) -> bool:
    """Whether ``torch.load(weights_only=True)`` has no published bypass in this torch version (>= 2.6)."""
    m = re.match(r"(\d+)\.(\d+)", version if version is not None else str(torch.__version__))
    return m is not None and (int(m.group(1)), int(m.group(2))) >= MIN_SAFE_TORCH


def _refuse_old_torch(path: Path, trust_pickle: bool) -> None:
    if not trust_pickle and not torch_version_ok():
        raise RefusedContentError(
            f"refused {path}: torch {torch.__version__} has a known bypass of weights_only loading (CVE-2025-32434), "
            "so pickle-based checkpoints are unsafe with it; upgrade to torch >= 2.6 or convert the file to "
            "safetensors")


# ------------------------------------------------------------------------------------------------- torch files
def check_torch_file(path: Path, fmt: str, trust_pickle: bool = False, max_bytes: int | None = None) -> None:
    """Refuse or reject a torch checkpoint before ``torch.load`` sees it (``fmt`` from ``sniff_format``).

    Raises ``RefusedContentError`` (would run code, bomb, TorchScript, tar, unsafe torch) or ``MalformedFileError``.
    """
    cap = max_pickle_bytes() if max_bytes is None else max_bytes
    if fmt == "torch-tar":
        raise RefusedContentError(
            f"refused {path}: legacy torch tar archive (torch < 0.4), which only full unpickling can read; re-save "
            "it with a current torch as a state dict, or convert it to safetensors")
    if fmt == "torch-zip":
        data = _check_zip(path, cap)
        names, _ = _scan(path, data, 1)
    elif fmt == "torch-legacy":
        with open(path, "rb") as f:
            head = f.read(cap + 1)  # the pickles come first; raw storage bytes follow them
        names, used = _scan(path, head, LEGACY_PICKLES, truncated_ok=len(head) <= cap)
        if used > cap:
            raise _too_big(path, cap, cap, more=True)
    else:
        return
    _refuse_old_torch(path, trust_pickle)
    _refuse_globals(path, names, trust_pickle)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"


def _too_big(path: Path, size: int, cap: int, more: bool = False) -> RefusedContentError:
    return RefusedContentError(
        f"refused {path}: its pickle is {'over ' if more else ''}{_size(size)} (limit {_size(cap)}); a state dict "
        "needs far less. If you trust the file, raise COLLAPSE_PROBE_MAX_PICKLE_MB")


def _scan(path: Path, data: bytes, count: int, truncated_ok: bool = True) -> tuple[list[str], int]:
    f = io.BytesIO(data)
    try:
        names, used = pickle_globals(f, count)
        # defence in depth: also what Python's own unpickler would import, read by its own parser
        return sorted(set(names) | set(unpickler_globals(data, count))), used
    except Exception as e:  # genops: ValueError on bad opcodes / short reads; nothing was executed
        if not truncated_ok and f.tell() >= len(data):  # ran into the end of the capped read: too big
            raise _too_big(path, len(data) - 1, len(data) - 1, more=True) from e
        raise MalformedFileError(f"{path} holds a corrupt pickle ({one_line(e)}); the file is damaged or not a "
                                 "torch checkpoint") from e


def _check_zip(path: Path, cap: int) -> bytes:
    """Validate a torch zip archive's structure without decompressing anything; return its ``data.pkl`` bytes."""
    try:
        return _check_zip_layout(path, cap)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, OverflowError, struct.error, EOFError,
            NotImplementedError, UnicodeError) as e:  # whatever else a damaged directory makes zipfile raise
        raise MalformedFileError(f"{path} is a corrupt zip archive ({one_line(e)})") from e


def _check_zip_layout(path: Path, cap: int) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as f:
        tail_len = min(size, 22 + 0xFFFF)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        eocd = tail.rfind(b"PK\x05\x06")
        if eocd < 0 or len(tail) - eocd < 22:
            raise MalformedFileError(f"{path} is a truncated zip archive (no end-of-archive record); re-download or "
                                     "re-save it")
        comment_len = struct.unpack("<H", tail[eocd + 20:eocd + 22])[0]
        if eocd + 22 + comment_len != len(tail):
            raise MalformedFileError(f"{path} has data after its zip end-of-archive record (truncated, appended to, "
                                     "or two archives in one); re-save it with torch.save")
        try:
            zf = zipfile.ZipFile(f)
            infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, struct.error, EOFError,
                NotImplementedError, UnicodeDecodeError) as e:
            raise MalformedFileError(f"{path} is a corrupt zip archive ({one_line(e)})") from e
        if not infos:
            raise MalformedFileError(f"{path} is an empty zip archive, not a torch checkpoint")
        prefix = infos[0].filename.split("/", 1)[0] + "/"
        names = {i.filename for i in infos}
        if len(names) != len(infos):  # readers disagree on which duplicate wins: a classic smuggling trick
            raise MalformedFileError(f"{path} is a zip archive with duplicate entry names (corrupt or crafted)")
        if any(n.startswith(prefix + "code/") for n in names) or prefix + "constants.pkl" in names:
            raise RefusedContentError(
                f"refused {path}: TorchScript archive: contains code; export a state dict instead "
                "(torch.save(model.state_dict(), ...) or safetensors)")
        extents = []
        for i in infos:
            if i.compress_type != zipfile.ZIP_STORED:
                raise RefusedContentError(
                    f"refused {path}: entry {i.filename} is compressed (method {i.compress_type}), which torch never "
                    "writes and decompression bombs need; re-save it with torch.save")
            if i.file_size != i.compress_size or i.file_size > size:
                raise RefusedContentError(
                    f"refused {path}: entry {i.filename} declares {i.file_size} bytes in a {size}-byte archive "
                    "(a decompression bomb or a forged header); re-save it with torch.save")
            if not 0 <= i.header_offset < size:
                raise MalformedFileError(f"{path}: zip entry {i.filename} starts outside the file (corrupt archive)")
            f.seek(i.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise MalformedFileError(f"{path}: zip entry {i.filename} has no local header (truncated or "
                                         "corrupt archive)")
            method, name_len, extra_len = struct.unpack("<H", local[8:10])[0], *struct.unpack("<HH", local[26:30])
            raw_name = i.orig_filename.encode("utf-8" if i.flag_bits & 0x800 else "cp437", "replace")
            if method != zipfile.ZIP_STORED or f.read(name_len) != raw_name:
                raise MalformedFileError(f"{path}: zip entry {i.filename} disagrees with its local header (corrupt "
                                         "or crafted archive)")
            end = i.header_offset + 30 + name_len + extra_len + i.compress_size
            extents.append((i.header_offset, end, i.filename))
        cd_start = getattr(zf, "start_dir", size)  # entries must end before the central directory
        extents.sort()
        if extents[0][0] != 0:  # the file starts with a local header (sniffed); an archive that skips it is two
            raise MalformedFileError(f"{path}: zip directory does not start at the first entry (data prepended or "
                                     "corrupt archive)")
        for (s0, e0, n0), (s1, _e1, n1) in zip(extents, extents[1:]):
            if e0 > s1:
                raise RefusedContentError(f"refused {path}: zip entries {n0} and {n1} overlap (a zip-bomb "
                                          "construction); re-save it with torch.save")
        if extents[-1][1] > cd_start:
            raise MalformedFileError(f"{path}: zip entry {extents[-1][2]} runs past the end of the data (truncated "
                                     "or corrupt archive)")
        pkl = prefix + "data.pkl"
        if pkl not in names:
            raise MalformedFileError(f"{path} is a zip archive without {pkl}: not a torch.save checkpoint")
        info = zf.getinfo(pkl)
        if info.file_size > cap:
            raise _too_big(path, info.file_size, cap)
        try:
            return zf.read(info)  # STORED: a plain copy of at most `cap` bytes, CRC-checked
        except (zipfile.BadZipFile, OSError, ValueError, struct.error, EOFError) as e:
            raise MalformedFileError(f"{path}: cannot read {pkl} ({one_line(e)})") from e


# ------------------------------------------------------------------------------------------------- safetensors
def check_safetensors(path: Path, max_header: int = MAX_SAFETENSORS_HEADER) -> None:
    """Validate a safetensors file's header against its size; ``MalformedFileError`` names the first defect."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MalformedFileError(f"{path} is a truncated safetensors file ({size} bytes, no header)")
        n = struct.unpack("<Q", head)[0]
        if n > max_header or n > size - 8:
            raise MalformedFileError(f"{path}: safetensors header declares {n} bytes but the file has {size - 8} "
                                     "after the length field (truncated or corrupt)")
        raw = f.read(n)
    bad = "safetensors header"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MalformedFileError(f"{path}: {bad} is not valid JSON ({one_line(e)}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise MalformedFileError(f"{path}: {bad} is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise MalformedFileError(f"{path}: safetensors __metadata__ must map strings to strings")
    buffer = size - 8 - n
    spans = []
    for name, t in header.items():
        if not isinstance(t, dict) or set(t) - {"dtype", "shape", "data_offsets"} or len(t) != 3:
            raise MalformedFileError(f"{path}: {bad} entry {name!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offs = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise MalformedFileError(f"{path}: tensor {name!r} has unknown dtype {str(dtype)[:20]!r} (known: "
                                     f"{', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise MalformedFileError(f"{path}: tensor {name!r} has an invalid shape {str(shape)[:40]}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1] <= buffer):
            raise MalformedFileError(f"{path}: tensor {name!r} has data offsets {str(offs)[:40]} outside the "
                                     f"{buffer}-byte data buffer (truncated or corrupt file)")
        if math.prod(shape) * SAFETENSORS_DTYPES[dtype] != offs[1] - offs[0]:
            raise MalformedFileError(f"{path}: tensor {name!r} is {dtype} {shape} but its data offsets span "
                                     f"{offs[1] - offs[0]} bytes")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for s, e, name in spans:
        if s != pos:
            what = "overlaps the previous tensor" if s < pos else f"leaves a gap of {s - pos} bytes"
            raise MalformedFileError(f"{path}: tensor {name!r} {what} in the data buffer (corrupt file)")
        pos = e
    if pos != buffer:
        raise MalformedFileError(f"{path}: the tensors cover {pos} of the {buffer} data bytes (corrupt or "
                                 "appended-to file)")


# ------------------------------------------------------------------------------------------------- values
def check_finite(state_dict: dict[str, torch.Tensor], path: Path | str) -> None:
    """``MalformedFileError`` when floating-point weights hold NaN or Inf (a diverged run or a corrupt file).

    Non-finite weights make every attention map NaN, so the collapse numbers would be meaningless.
    """
    bad = []
    for k, v in state_dict.items():
        if v.is_floating_point() or v.is_complex():
            if v.element_size() == 1:  # float8 kinds: isfinite is not implemented for all of them
                v = v.float()
            n = int((~torch.isfinite(v)).sum())
            if n:
                bad.append((k, n, int(torch.isnan(v).sum())))
    if bad:
        shown = "; ".join(f"{k}: {nan} NaN, {n - nan} Inf" for k, n, nan in bad[:3])
        raise MalformedFileError(
            f"{path} has non-finite weights in {len(bad)} tensors ({shown}{'; ...' if len(bad) > 3 else ''}); the "
            "run diverged or the file is corrupt: use an earlier checkpoint")


# factory options of timm.create_model: a file's metadata must never choose them (another file, a download, a cache)
FACTORY_OPTIONS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                             "scriptable", "exportable", "no_jit", "features_only", "pretrained_strict"})


def steering_keys(args: dict) -> list[str]:
    """Factory options in ``args`` that are set (timm records them as None / False when unused): any of them would
    make a loader open other files or download."""
    return sorted(k for k in FACTORY_OPTIONS & set(args) if args[k] not in (None, False))


def check_model_args(metadata: dict, state_dict: dict[str, torch.Tensor], path: Path | str) -> None:
    """Refuse a stored model config that steers timm's factory or asks for a model far larger than its weights.

    ``depth`` must match the blocks stored and be at most ``MAX_DEPTH``; every other number must be at most 16 x the
    largest dimension of a non-empty stored tensor (true for real configs: widths <= dimensions, image size <= 16 x
    the largest dimension; false for ``embed_dim=10**7``). ``build_model`` also compares shapes on the meta device
    before allocating anything, so what passes here still cannot make it allocate more than the weights justify.
    """
    arch, args = metadata.get("architecture"), metadata.get("model_args", {})
    if not isinstance(arch, str) or not isinstance(args, dict):
        raise MalformedFileError(f"{path}: stored model config is malformed (architecture must be a name, model_args "
                                 "a mapping); pass --model NAME")
    steering = steering_keys(args)
    if steering:
        raise RefusedContentError(f"refused {path}: its stored model config sets {', '.join(steering)}, which would "
                                  "make timm load other files or download; pass --model NAME to ignore it")
    stored = {k: t for k, t in state_dict.items() if t.numel() > 0}  # zero-size tensors cost nothing to forge
    bound = 16 * max((max(t.shape) for t in stored.values() if t.ndim > 0), default=1)
    depth = args.get("depth")
    if isinstance(depth, int) and not isinstance(depth, bool):
        blocks = {k.split(".")[1] for k in stored if k.startswith("blocks.") and k.split(".")[1].isdigit()}
        if depth > MAX_DEPTH:
            raise RefusedContentError(f"refused {path}: stored model config asks for depth {depth} (limit "
                                      f"{MAX_DEPTH}); pass --model NAME to ignore the config")
        if blocks and depth != len(blocks):
            raise UnsupportedLayoutError(f"{path}: stored model config says depth {depth} but the weights hold "
                                         f"{len(blocks)} blocks; pass --model NAME")

    def numbers(x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from numbers(y)
        elif isinstance(x, dict):
            for y in x.values():
                yield from numbers(y)

    for key, value in args.items():
        for x in numbers(value):
            if not math.isfinite(x) or abs(x) > bound:
                raise RefusedContentError(
                    f"refused {path}: stored model config has {key}={str(value)[:40]}, far larger than its weights "
                    f"could fit (limit {bound}); pass --model NAME to ignore the config")
