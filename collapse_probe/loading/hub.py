"""Hugging Face Hub ids as users type them, resolved to a folder in huggingface_hub's cache that ``loading.read``
then reads like a local timm / HuggingFace folder, with every safety check.

    folder, note = resolve("timm/vit_tiny_patch16_224.augreg_in21k")   # or "hf-hub:timm/NAME", or "org/name"
    resolve("runs/model.pt")                                            # None: a file name, not a repository id

Only what the folder readers use is fetched: config.json, model.safetensors (preferred; pytorch_model.bin, read with
``weights_only``, only when the repository has no safetensors) and preprocessor_config.json. With ``HF_HUB_OFFLINE=1``
only the local cache is looked at (``local_files_only``); an id that is not there is one line (exit 2), as is any
failure to reach the Hub: metadata requests time out after ``ETAG_TIMEOUT`` seconds instead of hanging. The cache is
huggingface_hub's (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub) and so is the endpoint
(``HF_ENDPOINT``), both read from the environment at each call. A local path that exists always wins:
``read_checkpoint`` asks here only for paths that do not exist.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import BadArgumentError, one_line

ETAG_TIMEOUT = 10.0  # seconds for each metadata request
FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]
FALLBACK = ["config.json", "pytorch_model.bin", "preprocessor_config.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# a missing local file, not a repository someone named: "ckpts/model.pt"
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar", ".pkl", ".pickle", ".json", ".py")


def hub_id(text: str) -> str | None:
    """The repository id ``text`` names (``hf-hub:org/name``, ``org/name``), or None when it is no id."""
    t = text.strip()
    explicit = t.startswith("hf-hub:")
    t = t.removeprefix("hf-hub:")
    if not _REPO_ID.fullmatch(t) or ".." in t or t.endswith("."):
        if explicit:
            raise BadArgumentError(f"{text}: not a Hugging Face Hub repository id (hf-hub:ORG/NAME)")
        return None
    if not explicit and Path(t).suffix.lower() in _FILE_SUFFIXES:
        return None
    return t


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids network access (huggingface_hub's truthy spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _download(repo: str, files: list[str], local_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars = not are_progress_bars_disabled()
    disable_progress_bars()  # their stderr lines would break our one-line output
    try:
        return Path(snapshot_download(repo, allow_patterns=files, cache_dir=cache_dir(), local_files_only=local_only,
                                      etag_timeout=ETAG_TIMEOUT, endpoint=os.environ.get("HF_ENDPOINT") or None))
    finally:
        if bars:
            enable_progress_bars()


def _why(e: Exception, repo: str, local_only: bool) -> str:
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return f"Hugging Face Hub repository {repo} is gated: accept its terms and log in, or pass a local copy"
    if isinstance(e, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
        return f"no Hugging Face Hub repository {repo} (or it is private); check the id, or pass a local path"
    if isinstance(e, errors.HFValidationError):
        return f"{repo} is not a valid Hugging Face Hub repository id ({one_line(e, 120)})"
    if isinstance(e, errors.LocalEntryNotFoundError) or local_only:
        if local_only:
            return (f"no local file or folder {repo}, and Hub id {repo} is not in the local cache ({cache_dir()}) "
                    "while HF_HUB_OFFLINE=1 forbids downloading; download it once online, or pass a local path")
        return (f"no local file or folder {repo}, and Hub id {repo} could not be fetched (no connection to the Hub?) "
                f"nor found in the local cache ({cache_dir()}); pass a local path")
    return f"Hub id {repo} could not be fetched: {type(e).__name__}: {one_line(e, 160)}"


def resolve(text: str) -> tuple[Path, str] | None:
    """(the cached snapshot folder for the Hub id ``text``, a note saying so), or None when ``text`` is no id."""
    repo = hub_id(text)
    if repo is None:
        return None
    local_only = offline()
    try:
        folder = _download(repo, FILES, local_only)
        if not (folder / "model.safetensors").is_file() and not local_only:
            folder = _download(repo, FALLBACK, local_only)  # an older repository without safetensors
    except KeyboardInterrupt:
        raise
    except Exception as e:  # connection errors, timeouts, missing repositories: one line, never a traceback
        raise BadArgumentError(_why(e, repo, local_only)) from e
    if not (folder / "config.json").is_file():
        raise BadArgumentError(f"Hub id {repo}: its snapshot ({folder}) has no config.json, so it is no timm or "
                               "HuggingFace model folder; download the weights and pass the file")
    where = "local cache, HF_HUB_OFFLINE=1" if local_only else "local cache"
    return folder, f"Hugging Face Hub id {repo}, read from {folder} ({where})"
