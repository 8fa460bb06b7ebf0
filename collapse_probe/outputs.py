"""Writing outputs without destroying what the user owns: the one implementation for files and folders.

    write_file("out/sim.json", lambda tmp: Path(tmp).write_text(text))    # atomic; a symlink is written through
    write_folder("out/report", {"report.md": b"...", "results/a.json": b"{}"})   # replaces only a folder we wrote
    write_folder("figs", fill=lambda staging: savefigs(staging))          # or fill a staging folder yourself

Rules (why: a report folder given to ``-o`` may be a user's project folder, a symlink, or a device node):

- A file is written to a temporary sibling, flushed and renamed over the target, so readers see the old file or the
  new one. A symlink is written through (its target is replaced, the link stays). Device nodes, FIFOs, sockets and
  anything under /dev or /proc are refused; ``is_stdout`` tells the caller when the path means standard output.
- A folder is built in full in a hidden staging sibling, then swapped with the old folder in one atomic step
  (Linux ``renameat2(RENAME_EXCHANGE)``), and the old copy is deleted. A folder that exists is replaced only when it
  is empty or carries our manifest (``MANIFEST``) and holds nothing else than the files it lists, unchanged (same
  size and SHA-256); anything else is refused with exit 2 and left exactly as it was.
- SIGINT / SIGTERM are held back during the swap and the clean-up, so an interrupt sees the old folder or the new
  one. After SIGKILL, the next run removes the stale staging folder (or, on systems without an atomic exchange, puts
  the earlier folder back) before it writes.
- Every ``OSError`` while writing (disk full, read-only folder, no permission) becomes one ``BadArgumentError`` line
  (exit 2) naming the path and the reason; nothing is left.
- Temporary names are ``.<name>.collapse-probe-<pid>-<nonce><check>.tmp``: ``<name>`` shortened with a hash when long
  or not UTF-8 (every name stays within the 255-byte limit of a file name), ``<check>`` a hash of this host, name,
  pid and nonce. A temporary file or folder left by a killed run (its pid dead, its check ours; never anything else)
  is removed by the next write into the same folder.

``committed`` lists what this process has finished writing, so an interrupted command can say whether it wrote.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .errors import BadArgumentError

MANIFEST = ".collapse-probe-manifest.json"
_STAGING_MARK = ".collapse-probe-staging"
_STEM_BYTES = 150  # of the target's name kept in a temporary name: with our 45-byte frame, well under 255
_TEMP = re.compile(r"^\.(?P<stem>.+)\.collapse-probe-(?P<pid>\d+)-(?P<nonce>[0-9a-f]{8})(?P<check>[0-9a-f]{8})"
                   r"\.(?P<ext>tmp|old)$", re.DOTALL)
_STDOUT_ALIASES = {"-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"}
_SPECIAL_ROOTS = ("/dev", "/proc", "/sys")
committed: list[Path] = []


def is_stdout(path: str | Path | None) -> bool:
    """Whether ``-o path`` means standard output (``-`` or one of its device aliases)."""
    return path is not None and str(path) in _STDOUT_ALIASES


def _fail(path: Path, e: OSError) -> BadArgumentError:
    reason = e.strerror or type(e).__name__
    return BadArgumentError(f"cannot write {path}: {reason}; choose another output path")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Delay SIGINT/SIGTERM until the block is done, then deliver them to the handlers that were in place.

    Python-level handlers are swapped rather than the thread's signal mask, because torch's worker threads would
    still take the signal; outside the main thread (embedded use) nothing can be held.
    """
    pending: list[int] = []
    try:
        old = {s: signal.signal(s, lambda signum, _frame: pending.append(signum))
               for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in pending:
            signal.raise_signal(s)


def _special(path: Path) -> str | None:
    """Why ``path`` (resolved) may not be written as an ordinary file, or None."""
    if any(str(path) == r or str(path).startswith(r + "/") for r in _SPECIAL_ROOTS):
        return "is a system path (device or kernel file)"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.strerror or "cannot be inspected"
    if stat.S_ISDIR(mode):
        return "is a folder"
    if not stat.S_ISREG(mode):
        return "is a device, FIFO or socket, not a file"
    return None


def _umask() -> int:
    """The process umask (reading it means setting it: put straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _stem(name: str) -> str:
    """``name`` as our temporary names carry it: itself when short and UTF-8, else a UTF-8 prefix and a hash."""
    raw = os.fsencode(name)
    try:
        raw.decode("utf-8")
        if len(raw) <= _STEM_BYTES:
            return name
    except UnicodeDecodeError:
        pass
    keep = raw[:_STEM_BYTES - 13].decode("utf-8", "ignore")  # a cut character or non-UTF-8 byte is dropped
    return f"{keep}~{hashlib.sha256(raw).hexdigest()[:12]}"


def _check_of(stem: str, pid: str, nonce: str) -> str:
    """The hash that marks a temporary name as made by collapse-probe on this host (another host's pids mean
    nothing here, so a shared folder's temporaries of other machines are never touched)."""
    return hashlib.sha256(f"collapse-probe\0{platform.node()}\0{stem}\0{pid}\0{nonce}".encode(
        "utf-8", "surrogateescape")).hexdigest()[:8]


def _temp_name(target: Path, ext: str = "tmp") -> Path:
    stem, pid, nonce = _stem(target.name), str(os.getpid()), os.urandom(4).hex()
    return target.with_name(f".{stem}.collapse-probe-{pid}-{nonce}{_check_of(stem, pid, nonce)}.{ext}")


def _new_temp(target: Path, folder: bool = False) -> Path:
    """Create a private temporary file or folder next to ``target`` under a fresh name of ours."""
    for _ in range(100):
        tmp = _temp_name(target)
        try:
            if folder:
                os.mkdir(tmp, 0o700)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def _ours(name: str) -> re.Match | None:
    """The parts of a temporary name made by collapse-probe on this host, or None."""
    m = _TEMP.match(name)
    return m if m and m["check"] == _check_of(m["stem"], m["pid"], m["nonce"]) else None


def sweep_stale(folder: Path) -> None:
    """Remove temporary files and staging folders that killed runs of ours left in ``folder`` (pid dead, name ours;
    a folder only with our staging mark inside). Swapped-aside ``.old`` folders are ``_recover``'s to put back."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        m = _ours(e.name)
        if not m or m["ext"] != "tmp" or _pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if e.is_file(follow_symlinks=False):
                os.unlink(e.path)
            elif e.is_dir(follow_symlinks=False) and (Path(e.path) / _STAGING_MARK).is_file():
                shutil.rmtree(e.path)


def file_target(path: str | Path) -> Path:
    """The regular file that writing ``path`` replaces (a symlink's target); raises BadArgumentError otherwise."""
    path = Path(path)
    try:
        target = Path(os.path.realpath(path)) if path.is_symlink() else path.absolute()
    except OSError as e:
        raise _fail(path, e) from e
    why = _special(target)
    if why:
        hint = " (use -o - for standard output)" if "device" in why else ""
        raise BadArgumentError(f"--output {path} {why}: refusing to replace it{hint}")
    return target


def write_file(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``'s target: old file or new, never partial or a stray temp."""
    target = file_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target.parent)
        tmp = str(_new_temp(target))
    except OSError as e:
        raise _fail(Path(path), e) from e
    try:
        try:  # keep an existing file's permissions; else what a plain open() would give
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        write(tmp)
        os.chmod(tmp, mode)  # after write: a writer may replace tmp with its own private file (safetensors does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _fail(Path(path), e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    committed.append(target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entries(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files under ``folder`` by relative POSIX name, and the names of anything else (links, devices)."""
    files, other = {}, []
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                other.append(rel)
            elif p.is_file():
                files[rel] = p
    return files, other


def manifest_of(folder: Path) -> dict:
    """Our manifest for the files now in ``folder``: every file's size and SHA-256."""
    files, _ = _entries(folder)
    return {"tool": "collapse-probe", "files": {
        rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in sorted(files.items())
        if rel not in (MANIFEST, _STAGING_MARK)}}


def foreign_files(folder: Path) -> list[str]:
    """What in ``folder`` collapse-probe did not write or that changed since (empty: safe to replace)."""
    files, other = _entries(folder)
    if not files and not other:
        return []
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        assert isinstance(listed, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return sorted([*files, *other])
    foreign = list(other)
    for rel, p in files.items():
        if rel == MANIFEST:
            continue
        want = listed.get(rel)
        if not isinstance(want, dict) or want.get("size") != p.stat().st_size or want.get("sha256") != _sha256(p):
            foreign.append(rel)
    return sorted(foreign)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(output: Path) -> None:
    """Clean up after a run killed mid-write: stale staging removed, an earlier folder put back if it was moved."""
    stem = _stem(output.name)
    for sib in sorted(output.parent.iterdir()) if output.parent.is_dir() else []:
        m = _ours(sib.name)
        if not m or m["stem"] != stem or not sib.is_dir() or sib.is_symlink() or _pid_alive(int(m["pid"])):
            continue
        # ours: a staging folder (marked) or an earlier report swapped out of place (manifest, nothing foreign)
        owned = (sib / MANIFEST).is_file() and not foreign_files(sib)
        if not (sib / _STAGING_MARK).is_file() and not owned and any(sib.iterdir()):
            continue
        if m["ext"] == "old" and not output.exists():
            (sib / _STAGING_MARK).unlink(missing_ok=True)
            os.replace(sib, output)
        else:
            shutil.rmtree(sib, ignore_errors=True)


def check_replaceable(output: str | Path) -> None:
    """Raise BadArgumentError unless ``write_folder(output)`` may replace what is there (call it before long work)."""
    output = Path(output)
    try:
        _check(output)
    except OSError as e:
        raise _fail(output, e) from e


def _check(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise BadArgumentError(f"--output {output} {_special(output.resolve()) or 'is a file'}; give a folder")
    if not output.exists():
        return
    if Path.cwd().resolve() == output.resolve():
        raise BadArgumentError(f"--output {output} is the current folder; give a new sub-folder such as ./report")
    foreign = foreign_files(output)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise BadArgumentError(f"--output {output} holds files collapse-probe did not write ({shown}); nothing was "
                               "changed: choose a new or empty folder, or move those files")


def write_folder(output: str | Path, files: Mapping[str, bytes] | None = None,
                 fill: Callable[[Path], object] | None = None) -> Path:
    """Write ``files`` (relative name -> bytes) and/or what ``fill(staging)`` creates as folder ``output``.

    An existing ``output`` is replaced in one atomic step, and only when collapse-probe wrote all of it (see the module
    docstring); a symlink to a folder is written through. Returns the folder written.
    """
    given = Path(output)
    try:
        output = Path(os.path.realpath(given)) if given.is_symlink() else given.absolute()
        output.parent.mkdir(parents=True, exist_ok=True)
        _recover(output)
        sweep_stale(output.parent)
    except OSError as e:
        raise _fail(given, e) from e
    check_replaceable(output)
    try:
        staging = _new_temp(output, folder=True)
    except OSError as e:
        raise _fail(given, e) from e
    try:
        (staging / _STAGING_MARK).write_text(str(os.getpid()))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; a report folder is an ordinary folder
        for name, data in (files or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        if fill is not None:
            fill(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest_of(staging), indent=1) + "\n")
        with _signals_held():
            _commit(staging, output)
            committed.append(output)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise _fail(given, e) from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _commit(staging: Path, output: Path) -> None:
    """Put ``staging`` in ``output``'s place (signals held); the old folder, if any, is deleted afterwards."""
    # from here on the manifest alone identifies the staging folder, so no marker can travel into ``output``
    (staging / _STAGING_MARK).unlink()
    if not output.exists():
        os.replace(staging, output)
    elif _exchange(staging, output):  # now output is new, staging holds the old folder (manifest, nothing foreign)
        shutil.rmtree(staging)
    else:  # no atomic exchange: the old folder goes aside under a name _recover() knows, then the new one in
        old = staging.with_name(staging.name[: -len(".tmp")] + ".old")  # same stem, pid and check: still ours
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old)
