"""Hostile and broken inputs: each gets one error line, its own exit code, no code execution, no output file.

    pytest tests/test_security.py -q

The corpus is built here (``hostile.py``): pickles whose unpickling runs code (os.system, subprocess, exec, eval,
tempfile, a custom class, hidden next to real weights, protocol 4), each wrapped as a torch zip archive and as a legacy
torch file; zip bombs (deflate, forged sizes, overlapping entries), TorchScript and tar archives, oversized pickles;
truncated / inconsistent safetensors and zip files; NaN/Inf weights; wrong architectures; empty files, folders; image
folders with corrupt, truncated, bomb or no images. Every case runs through the real CLI (click's runner, in process);
a representative subset also runs as a separate ``python -m collapse_probe`` process.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from collapse_probe.cli import main
from collapse_probe.errors import CollapseProbeError, MalformedFileError, RefusedContentError
from collapse_probe.loading import safety
from collapse_probe.loading.build import build_model, create_model
from collapse_probe.loading.read import read_checkpoint
from collapse_probe.loading.save import save_checkpoint

from . import hostile

BAD_ARGS, REFUSED, MALFORMED, LAYOUT = 2, 3, 4, 5


class Workspace:
    """Files shared by the corpus cases: a good deepvit_micro checkpoint, a sentinel folder, helpers."""

    def __init__(self, root: Path) -> None:
        self.root, self.sentinel = root, root / "sentinel"
        self.sentinel.mkdir()
        self.good = root / "good.safetensors"
        save_checkpoint(create_model("deepvit_micro", depth=2), self.good)
        self.payloads = hostile.payloads(self.sentinel)
        self.n = 0

    def file(self, data: bytes, suffix: str = ".pt") -> Path:
        self.n += 1
        p = self.root / f"case{self.n}{suffix}"
        p.write_bytes(data)
        return p

    def with_weights(self, edit: Callable[[dict], None]) -> Path:
        """The good checkpoint with its state dict edited (metadata kept)."""
        from safetensors import safe_open

        with safe_open(str(self.good), "pt") as f:
            meta = f.metadata()
        sd = load_file(str(self.good))
        edit(sd)
        self.n += 1
        p = self.root / f"case{self.n}.safetensors"
        save_file(sd, str(p), metadata=meta)
        return p

    def with_meta(self, edit: Callable[[dict], object]) -> Path:
        """The good checkpoint with its stored model config edited (``edit`` may return a replacement)."""
        from safetensors import safe_open

        with safe_open(str(self.good), "pt") as f:
            meta = json.loads(f.metadata()["collapse_probe"])
        meta = edit(meta) or meta
        self.n += 1
        p = self.root / f"case{self.n}.safetensors"
        save_file(load_file(str(self.good)), str(p), metadata={"collapse_probe": json.dumps(meta)})
        return p

    def fifo(self) -> Path:
        p = self.root / "fifo.pt"
        if not p.exists():
            os.mkfifo(p)
        return p

    def images(self, files: dict[str, bytes]) -> Path:
        self.n += 1
        d = self.root / f"images{self.n}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        return d


def _png(w: int = 8, h: int = 8) -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb() -> bytes:
    """A valid small PNG whose IHDR (with a correct CRC) claims 60000 x 60000 pixels."""
    png = bytearray(_png())
    ihdr = bytearray(png[12:29])  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", 60000, 60000)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def _st(header: dict | None = None, buffer: bytes | None = None, edit: Callable[[dict], None] | None = None) -> bytes:
    h, b = hostile.good_safetensors()
    if edit:
        edit(h)
    return hostile.safetensors_bytes(header if header is not None else h, b if buffer is None else buffer)


def _set(path: list, value) -> Callable[[dict], None]:
    def edit(h: dict) -> None:
        d = h
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


def _legacy_big(ws: Workspace) -> Path:
    import pickle

    return hostile.as_legacy(ws.root / "legacy_big.pt", pickle.dumps({"w": "x" * 4096}, protocol=2))


# name -> (build(ws) -> CLI arguments after "similarity", expected exit code, environment overrides)
CASES: dict[str, tuple[Callable[[Workspace], list], int, dict]] = {}
for _name in hostile.payloads(Path("/nonexistent")):
    CASES[f"payload_zip_{_name}"] = (
        lambda ws, n=_name: [hostile.as_torch_zip(ws.root / f"{n}.pt", hostile.dumps(ws.payloads[n]))], REFUSED, {})
    CASES[f"payload_legacy_{_name}"] = (
        lambda ws, n=_name: [hostile.as_legacy(ws.root / f"{n}.legacy.pt", hostile.dumps(ws.payloads[n]))],
        REFUSED, {})
    CASES[f"payload_plain_pickle_{_name}"] = (
        lambda ws, n=_name: [ws.file(hostile.dumps(ws.payloads[n]), ".pkl")], REFUSED, {})
CASES.update({
    # decompression bombs and archive tricks: refused before torch reads anything
    "zip_deflate_bomb": (lambda ws: [hostile.deflate_bomb(ws.root / "bomb.pt", 128)], REFUSED, {}),
    "zip_small_deflated_entry": (
        lambda ws: [ws.file(hostile.rewrite_zip(hostile.torch_zip_bytes(), compress={"/data.pkl"}))], REFUSED, {}),
    "zip_forged_uncompressed_size": (
        lambda ws: [ws.file(hostile.forge_sizes(hostile.torch_zip_bytes(), "data.pkl", uncompressed=0xFFFFFFF0))],
        REFUSED, {}),
    "zip_forged_both_sizes": (
        lambda ws: [ws.file(hostile.forge_sizes(hostile.torch_zip_bytes(), "data/0", 1 << 31, 1 << 31))],
        REFUSED, {}),
    "zip_overlapping_entries": (lambda ws: [ws.file(hostile.overlapping_zip(hostile.torch_zip_bytes()))],
                                REFUSED, {}),
    "zip_pickle_over_cap": (lambda ws: [ws.file(hostile.torch_zip_bytes({"w": torch.ones(2), "note": "x" * 4096}))],
                            REFUSED, {"COLLAPSE_PROBE_MAX_PICKLE_MB": "0.001"}),
    "legacy_pickle_over_cap": (lambda ws: [_legacy_big(ws)], REFUSED, {"COLLAPSE_PROBE_MAX_PICKLE_MB": "0.001"}),
    "torchscript_archive": (lambda ws: [_torchscript(ws.root / "ts.pt")], REFUSED, {}),
    "torchscript_archive_trusted": (lambda ws: [_torchscript(ws.root / "ts2.pt"), "--trust-pickle"], REFUSED, {}),
    "legacy_tar_archive": (lambda ws: [hostile.legacy_tar(ws.root / "old.tar")], REFUSED, {}),
    "config_sets_checkpoint_path": (lambda ws: [ws.with_meta(lambda m: m["model_args"].update(
        checkpoint_path=str(ws.good)))], REFUSED, {}),
    "config_sets_pretrained_cfg_overlay": (lambda ws: [ws.with_meta(lambda m: m["model_args"].update(
        pretrained_cfg_overlay={"file": str(ws.good)}))], REFUSED, {}),
    "config_depth_mismatch": (lambda ws: [ws.with_meta(lambda m: m["model_args"].update(depth=3))], LAYOUT, {}),
    "config_wrong_width_checked_on_meta": (lambda ws: [ws.with_meta(lambda m: m["model_args"].update(
        embed_dim=3072))], LAYOUT, {}),
    "config_depth_bomb": (lambda ws: [ws.with_meta(lambda m: m["model_args"].update(depth=10**9))], REFUSED, {}),
    "config_width_bomb": (lambda ws: [ws.with_meta(lambda m: m["model_args"].update(embed_dim=4 * 10**6))],
                          REFUSED, {}),
    "config_mlp_ratio_bomb": (lambda ws: [ws.with_meta(lambda m: m["model_args"].update(mlp_ratio=1e12))],
                              REFUSED, {}),
    # malformed files
    "config_not_an_object": (lambda ws: [ws.with_meta(lambda m: [1, 2])], MALFORMED, {}),
    "config_architecture_not_a_name": (lambda ws: [ws.with_meta(lambda m: m.update(architecture=["x"]))],
                                       MALFORMED, {}),
    "config_model_args_not_a_mapping": (lambda ws: [ws.with_meta(lambda m: m.update(model_args=[1]))],
                                        MALFORMED, {}),
    "empty_file": (lambda ws: [ws.file(b"")], MALFORMED, {}),
    "random_bytes": (lambda ws: [ws.file(os.urandom(4096))], MALFORMED, {}),
    "text_file": (lambda ws: [ws.file(b"not a checkpoint\n" * 20)], MALFORMED, {}),
    "zip_truncated_half": (lambda ws: [ws.file(hostile.torch_zip_bytes()[:700])], MALFORMED, {}),
    "zip_truncated_tail": (lambda ws: [ws.file(hostile.torch_zip_bytes()[:-3])], MALFORMED, {}),
    "zip_appended_garbage": (lambda ws: [ws.file(hostile.torch_zip_bytes() + b"junk")], MALFORMED, {}),
    "zip_without_data_pkl": (
        lambda ws: [ws.file(hostile.torch_zip_bytes().replace(b"data.pkl", b"data.pkx"))], MALFORMED, {}),
    "zip_corrupt_pickle": (
        lambda ws: [ws.file(hostile.rewrite_zip(hostile.torch_zip_bytes(), {"/data.pkl": b"\x80\x02garbage"}))],
        MALFORMED, {}),
    "zip_tensor_larger_than_storage": (lambda ws: [ws.file(_oversized_view())], MALFORMED, {}),
    "legacy_storage_size_forged": (lambda ws: [ws.file(_legacy_forged_storage())], MALFORMED, {}),
    "legacy_truncated": (lambda ws: [ws.file(_legacy_bytes()[:40])], MALFORMED, {}),
    "safetensors_truncated_length": (lambda ws: [ws.file(ws.good.read_bytes()[:5])], MALFORMED, {}),
    "safetensors_truncated_header": (lambda ws: [ws.file(ws.good.read_bytes()[:200])], MALFORMED, {}),
    "safetensors_truncated_data": (lambda ws: [ws.file(ws.good.read_bytes()[:-100], ".safetensors")], MALFORMED, {}),
    "safetensors_bad_json": (lambda ws: [ws.file(struct.pack("<Q", 9) + b"{not json" + bytes(8))], MALFORMED, {}),
    "safetensors_header_trailing_json": (
        lambda ws: [ws.file(struct.pack("<Q", 9) + b"{}" + b"[1,2,3]")], MALFORMED, {}),  # trailing bytes uncovered
    "safetensors_header_length_too_big": (lambda ws: [ws.file(struct.pack("<Q", 1 << 40) + b"{}")], MALFORMED, {}),
    "safetensors_unknown_dtype": (lambda ws: [ws.file(_st(edit=_set(["a", "dtype"], "F33")))], MALFORMED, {}),
    "safetensors_dtype_size_mismatch": (lambda ws: [ws.file(_st(edit=_set(["a", "dtype"], "F64")))], MALFORMED, {}),
    "safetensors_negative_shape": (lambda ws: [ws.file(_st(edit=_set(["a", "shape"], [-2, -3])))], MALFORMED, {}),
    "safetensors_offsets_out_of_range": (
        lambda ws: [ws.file(_st(edit=_set(["b", "data_offsets"], [24, 5000])))], MALFORMED, {}),
    "safetensors_offsets_reversed": (
        lambda ws: [ws.file(_st(edit=_set(["a", "data_offsets"], [24, 0])))], MALFORMED, {}),
    "safetensors_offsets_overlap": (
        lambda ws: [ws.file(_st(edit=_set(["b", "data_offsets"], [16, 48]), buffer=bytes(56)))], MALFORMED, {}),
    "safetensors_offsets_gap": (
        lambda ws: [ws.file(_st(edit=_set(["b", "data_offsets"], [32, 64]), buffer=bytes(64)))], MALFORMED, {}),
    "safetensors_buffer_not_covered": (lambda ws: [ws.file(_st(buffer=bytes(56 + 64)))], MALFORMED, {}),
    "safetensors_metadata_not_strings": (
        lambda ws: [ws.file(_st(edit=_set(["__metadata__", "note"], 3)))], MALFORMED, {}),
    "safetensors_bad_our_metadata": (
        lambda ws: [ws.file(_st(edit=_set(["__metadata__", "collapse_probe"], "{oops")))], MALFORMED, {}),
    "weights_nan": (lambda ws: [ws.with_weights(lambda sd: sd["blocks.0.attn.qkv.weight"].view(-1)
                                                .__setitem__(3, float("nan")))], MALFORMED, {}),
    "weights_inf": (lambda ws: [ws.with_weights(lambda sd: sd["head.weight"].view(-1)
                                                .__setitem__(0, float("-inf")))], MALFORMED, {}),
    # readable but not a model we can build
    "wrong_architecture_named": (lambda ws: [ws.good, "--model", "vit_micro"], LAYOUT, {}),
    "wrong_depth_in_metadata": (lambda ws: [ws.with_weights(lambda sd: [sd.pop(k) for k in list(sd)
                                                                       if k.startswith("blocks.1.")])], LAYOUT, {}),
    "wrong_shapes": (lambda ws: [ws.with_weights(lambda sd: sd.__setitem__("head.weight", torch.zeros(3, 64)))],
                     LAYOUT, {}),
    "zero_size_head_bomb": (lambda ws: [ws.file(hostile.safetensors_bytes(
        {"head.weight": {"dtype": "F32", "shape": [10**9, 0], "data_offsets": [0, 0]}}, b"")), "--model",
        "vit_micro"], LAYOUT, {}),
    "safetensors_without_architecture": (lambda ws: [ws.file(_st(), ".safetensors")], LAYOUT, {}),
    "zip_list_not_dict": (lambda ws: [ws.file(hostile.torch_zip_bytes([torch.ones(2)]))], LAYOUT, {}),
    "zip_dict_without_weights": (lambda ws: [ws.file(hostile.torch_zip_bytes({"epoch": 3, "lr": 0.1}))], LAYOUT, {}),
    "zip_missing_key": (lambda ws: [ws.file(hostile.torch_zip_bytes({"model": {"w": torch.ones(2)}})), "--key",
                                    "ema"], LAYOUT, {}),
    # bad arguments and image folders
    "missing_file": (lambda ws: [ws.root / "nope.safetensors"], BAD_ARGS, {}),
    "directory_as_checkpoint": (lambda ws: [ws.root], BAD_ARGS, {}),
    "fifo_as_checkpoint": (lambda ws: [ws.fifo()], BAD_ARGS, {}),
    "device_file_as_checkpoint": (lambda ws: [os.devnull], BAD_ARGS, {}),
    "images_folder_missing": (lambda ws: [ws.good, "--images", ws.root / "nowhere"], BAD_ARGS, {}),
    "images_is_a_file": (lambda ws: [ws.good, "--images", ws.good], BAD_ARGS, {}),
    "images_folder_empty": (lambda ws: [ws.good, "--images", ws.images({})], BAD_ARGS, {}),
    "images_folder_no_images": (lambda ws: [ws.good, "--images", ws.images({"notes.txt": b"hi"})], BAD_ARGS, {}),
    "images_corrupt": (lambda ws: [ws.good, "--images", ws.images({"a.png": _png(), "b.jpg": os.urandom(300)})],
                       BAD_ARGS, {}),
    "images_truncated": (lambda ws: [ws.good, "--images", ws.images({"a.png": _png(64, 64)[:60]})], BAD_ARGS, {}),
    "images_decompression_bomb": (lambda ws: [ws.good, "--images", ws.images({"a.png": _png_bomb()})], BAD_ARGS, {}),
    "bad_threshold": (lambda ws: [ws.good, "--threshold", "1.5"], BAD_ARGS, {}),
    "bad_device": (lambda ws: [ws.good, "--device", "tpu:7"], BAD_ARGS, {}),
    "key_on_safetensors": (lambda ws: [ws.good, "--key", "model"], BAD_ARGS, {}),
})


def _torchscript(path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


def _legacy_bytes() -> bytes:
    from io import BytesIO

    buf = BytesIO()
    torch.save({"w": torch.ones(4)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _legacy_forged_storage() -> bytes:
    """A legacy file whose raw storage record claims 2^40 elements (4 are stored): no allocation may follow."""
    data = _legacy_bytes()
    i = data.rfind(struct.pack("<q", 4))
    assert i > 0
    return data[:i] + struct.pack("<q", 1 << 40) + data[i + 8:]


def _oversized_view() -> bytes:
    """A tensor header asking for 10^6 elements of a 6-element storage (only allowlisted globals)."""
    src = hostile.torch_zip_bytes()
    import zipfile
    from io import BytesIO

    pkl = zipfile.ZipFile(BytesIO(src)).read("archive/data.pkl")
    patched = pkl.replace(b"K\x02K\x03\x86", b"J\x40\x42\x0f\x00K\x03\x86")  # size (2, 3) -> (1000000, 3)
    assert patched != pkl
    return hostile.rewrite_zip(src, {"/data.pkl": patched})


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("corpus"))


def _check_clean(ws: Workspace, out_dir: Path, stderr: str, code: int, expected: int) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == expected, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and lines[0].startswith("error: ")
    assert list(ws.sentinel.iterdir()) == [], "a payload ran"
    assert not out_dir.exists() or list(out_dir.iterdir()) == [], "output left behind"


@pytest.mark.parametrize("case", sorted(CASES))
def test_corpus_cli(case: str, ws: Workspace, tmp_path: Path, monkeypatch) -> None:
    build, expected, env = CASES[case]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = [str(a) for a in build(ws)]
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(main, ["similarity", *args, "--no-progress", "-o", str(out_dir / "r.json")])
    _check_clean(ws, out_dir, result.stderr, result.exit_code, expected)


def test_corpus_covers_every_exit_code() -> None:
    codes = [c for _, c, _ in CASES.values()]
    assert {codes.count(c) > 0 for c in (BAD_ARGS, REFUSED, MALFORMED, LAYOUT)} == {True}
    assert sum(1 for n in CASES if n.startswith("payload_")) == 3 * len(hostile.payloads(Path("/x")))


SUBPROCESS_CASES = ["payload_zip_os_system", "payload_legacy_subprocess_call", "zip_deflate_bomb",
                    "safetensors_truncated_data", "wrong_architecture_named", "images_corrupt"]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
            "COLLAPSE_PROBE_DEBUG": ""}


@pytest.mark.heavy  # six interpreter starts (torch + timm imports each)
@pytest.mark.timeout(600)
def test_corpus_real_process(ws: Workspace, tmp_path: Path) -> None:
    """The same guarantees in a real process (real stderr, real exit status), started in parallel to save time."""
    procs = {}
    for case in SUBPROCESS_CASES:
        build, expected, env = CASES[case]
        out = tmp_path / case
        cmd = [sys.executable, "-m", "collapse_probe", "similarity", *map(str, build(ws)), "--no-progress",
               "-o", str(out / "r.json")]
        procs[case] = (subprocess.Popen(cmd, env={**_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), expected, out)
    for case, (p, expected, out) in procs.items():
        stdout, stderr = p.communicate(timeout=500)
        assert stdout == "", case
        _check_clean(ws, out, stderr, p.returncode, expected)


@pytest.mark.parametrize("name", sorted(hostile.payloads(Path("/x"))))
def test_payloads_are_live_under_trust_pickle(name: str, tmp_path: Path) -> None:
    """The corpus is real: with --trust-pickle each payload does run (what the flag gives up), so 'refused' means
    something. The run still ends in a clean error, as the unpickled object is not a state dict."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    path = hostile.as_torch_zip(tmp_path / "p.pt", hostile.dumps(hostile.payloads(sentinel)[name]))
    with pytest.raises(RefusedContentError):
        read_checkpoint(path)
    assert list(sentinel.iterdir()) == []
    try:
        read_checkpoint(path, trust_pickle=True)
    except CollapseProbeError:
        pass
    assert len(list(sentinel.iterdir())) == 1


def test_refusal_names_the_globals(ws: Workspace) -> None:
    path = hostile.as_torch_zip(ws.root / "named.pt", hostile.dumps(ws.payloads["os_system"]))
    with pytest.raises(RefusedContentError, match="posix.system|os.system"):
        read_checkpoint(path)
    path = hostile.as_legacy(ws.root / "named2.pt", hostile.dumps(ws.payloads["builtins_exec"]))
    with pytest.raises(RefusedContentError, match=r"builtins\.exec"):
        read_checkpoint(path)


def _found_by_unpickler(data: bytes) -> set[int]:
    """Independent reference: the objects Python's own unpickler resolves (``find_class``), with every call stubbed
    out so nothing is constructed or run."""
    import io
    import pickle

    class Stub(dict):  # accepts any construction, state, items or appends
        def __init__(self, *a, **k) -> None:
            pass

        def __setstate__(self, state) -> None:
            pass

        def append(self, x) -> None:
            pass

        def extend(self, xs) -> None:
            pass

    found: set[int] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add(id(super().find_class(module, name)))
            return Stub

        def persistent_load(self, pid):
            return None

    Recorder(io.BytesIO(data)).load()
    return found


def _resolve(name: str) -> int:
    import importlib

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return id(obj)
    raise AssertionError(name)


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_scanner_matches_unpickler(protocol: int, tmp_path: Path) -> None:
    """Parity: the globals our static scan names are exactly those Python's unpickler would look up (protocol 2
    maps Python 2 names such as __builtin__.exec; protocol 4 uses STACK_GLOBAL and the memo)."""
    import pickle

    objs = list(hostile.payloads(tmp_path).values()) + [
        {"a": [1, 2.0, "s"], "b": (None, True)}, {"od": __import__("collections").OrderedDict(x=1), "s": {1}},
        [hostile.Reduce(subprocess.call, ["true"]), hostile.Reduce(subprocess.call, ["false"])]]
    for obj in objs:
        data = pickle.dumps(obj, protocol=protocol)
        names, used = safety.pickle_globals(data)
        assert used == len(data)
        assert {_resolve(n) for n in names} == _found_by_unpickler(data), names
    assert list(tmp_path.iterdir()) == []
    zipped = hostile.torch_zip_bytes({"w": torch.nn.Parameter(torch.ones(2)), "d": torch.device("cpu")})
    import zipfile
    from io import BytesIO

    data = zipfile.ZipFile(BytesIO(zipped)).read("archive/data.pkl")
    assert {_resolve(n) for n in safety.pickle_globals(data)[0]} == _found_by_unpickler(data)


@pytest.mark.parametrize("version,ok", [("2.5.1", False), ("2.5.1+cu121", False), ("2.4.0", False), ("1.13.1", False),
                                        ("2.6.0", True), ("2.6.0a0+git", True), ("2.14.1+cu130", True),
                                        ("3.0.0", True), ("garbage", False)])
def test_torch_version_gate(version: str, ok: bool) -> None:
    assert safety.torch_version_ok(version) is ok


def test_old_torch_refuses_pickle_but_not_safetensors(ws: Workspace, monkeypatch) -> None:
    """CVE-2025-32434: torch <= 2.5.1 loads weights_only pickles unsafely; we refuse them there (safetensors is fine,
    and --trust-pickle, which gives up safety anyway, still works)."""
    good_pt = ws.root / "good_old.pt"
    torch.save({"w": torch.ones(3)}, good_pt)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(RefusedContentError, match="CVE-2025-32434"):
        read_checkpoint(good_pt)
    legacy = ws.file(_legacy_bytes())
    with pytest.raises(RefusedContentError, match="CVE-2025-32434"):
        read_checkpoint(legacy)
    assert read_checkpoint(good_pt, trust_pickle=True).state_dict["w"].sum() == 3
    assert read_checkpoint(ws.good).format == "safetensors"


def test_legitimate_files_still_load(ws: Workspace, tmp_path: Path) -> None:
    """The checks do not refuse what torch.save and safetensors write: state dicts, training checkpoints with
    optimizer state, legacy files, sets/complex/devices, and our own safetensors (round trip)."""
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "tags": {"a"}, "z": 1j,
                "device": torch.device("cpu")}, tmp_path / "train.pt")
    ck = read_checkpoint(tmp_path / "train.pt")
    assert ck.key == "model" and torch.equal(ck.state_dict["weight"], m.weight.detach())
    torch.save(m.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert read_checkpoint(tmp_path / "legacy.pt").format == "torch-legacy"
    h, b = hostile.good_safetensors()
    sd = read_checkpoint(ws.file(hostile.safetensors_bytes(h, b))).state_dict
    assert sd["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and sd["b"].tolist() == [0, 1, 2, 3]
    model, info = build_model(read_checkpoint(ws.good))
    assert info.architecture == "deepvit_micro"


def test_nonfinite_weights_opt_in(ws: Workspace) -> None:
    path = ws.with_weights(lambda sd: sd["head.bias"].fill_(float("nan")))
    with pytest.raises(MalformedFileError, match="head.bias: 10 NaN, 0 Inf"):
        build_model(read_checkpoint(path))
    model, _ = build_model(read_checkpoint(path, allow_nonfinite=True))
    assert torch.isnan(model.head.bias).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.complex64])
def test_check_finite_every_float_dtype(dtype: torch.dtype) -> None:
    """NaN is found in every floating dtype a safetensors file can hold; finite tensors and integers pass."""
    safety.check_finite({"w": torch.ones(4).to(dtype), "i": torch.arange(3)}, "x")
    bad = torch.ones(4)
    bad[1] = float("nan")
    with pytest.raises(MalformedFileError, match="w: 1 NaN"):
        safety.check_finite({"w": bad.to(dtype)}, "x")


def test_safetensors_validator_agrees_with_library(ws: Workspace) -> None:
    """Every corpus safetensors file our validator rejects is also rejected by the safetensors library itself
    (so the checks are not inventing defects), and the valid ones pass both."""
    from safetensors import safe_open

    names = [n for n in CASES if n.startswith("safetensors_") and CASES[n][1] == MALFORMED
             and n not in ("safetensors_bad_our_metadata", "safetensors_truncated_length")]
    assert len(names) >= 12
    for n in names:
        path = Path(CASES[n][0](ws)[0])
        with pytest.raises(MalformedFileError):
            safety.check_safetensors(path)
        with pytest.raises(Exception):  # noqa: B017 (any library error is the point)
            with safe_open(str(path), "pt") as f:
                [f.get_tensor(k) for k in f.keys()]
    safety.check_safetensors(ws.good)


def test_cli_output_is_complete_json_on_success(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "ok.json"
    result = CliRunner().invoke(main, ["similarity", str(ws.good), "--no-progress", "--num-images", "2",
                                       "--format", "json", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "attention" in json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json"]


def test_stored_config_is_checked_on_meta_before_allocating(ws: Workspace, monkeypatch) -> None:
    """A config that does not fit its weights is only ever built on the meta device (no memory), then rejected; a
    fitting one is built for real once its shapes were checked."""
    import collapse_probe.loading.build as ck

    devices = []
    real = ck.create_model

    def spy(name, **kw):
        devices.append(torch.get_default_device().type)
        return real(name, **kw)

    monkeypatch.setattr(ck, "create_model", spy)
    wide = ws.with_meta(lambda m: m["model_args"].update(embed_dim=3072))
    with pytest.raises(CollapseProbeError, match="does not fit"):
        build_model(read_checkpoint(wide))
    assert devices == ["meta"]
    devices.clear()
    model, _ = build_model(read_checkpoint(ws.good))
    assert devices == ["meta", "cpu"] and next(model.parameters()).device.type == "cpu"
