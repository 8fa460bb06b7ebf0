"""Your own model code, run only because you named it: import it, find the class or function, build the model.

    module = import_code("my_vit.py")                    # a .py file, or an importable module name ("mypkg.vit")
    factory = find_factory(module, "MyViT", "my_vit.py") # a class or function in it, or a timm name it registered
    args = parse_model_args('{"depth": 6, "heads": 8}')  # a JSON object -> dict; anything else exit 2
    model = call_factory(factory, args)                  # an error inside your code: one line naming file:line

Running this code is the user's choice, as ``python my_vit.py`` would be (``--model-code`` says so in --help); the
checkpoint itself is still read with every safety check (``loading.read``) and loaded strictly (``loading.weights``).
A file is imported under a unique module name with its folder on ``sys.path`` during the import, so it can import its
siblings; the same unchanged file is imported once per process (a timm ``register_model`` would warn the second time).
Errors in the user's code (import, constructor, a name that is not there) are ``BadArgumentError`` (exit 2), one line
naming the file and line where the traceback shows one.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import BadArgumentError, one_line
from .heads import square_side

Factory = Callable[..., nn.Module]
_IMPORTED: dict[tuple[str, int, int], ModuleType] = {}  # (resolved path, mtime_ns, size) -> module


def _where(e: BaseException, origin: str | None) -> str:
    """' at FILE:LINE' of the deepest traceback frame in the user's file (or folder), else of the deepest frame."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" at {e.filename}:{e.lineno}"
    frames = traceback.extract_tb(e.__traceback__)
    if origin is not None:
        folder = str(Path(origin).parent)
        mine = [f for f in frames if f.filename == origin] or [f for f in frames if f.filename.startswith(folder)]
        frames = mine or frames
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _fail(what: str, e: BaseException, origin: str | None) -> BadArgumentError:
    return BadArgumentError(f"{what}: {type(e).__name__}: {one_line(e, 200)}{_where(e, origin)}")


def import_code(spec: str | Path) -> ModuleType:
    """The user's module: ``spec`` is a path to a .py file or a dotted module name importable from ``sys.path``."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix == ".py" or path.exists() or "/" in text or "\\" in text:
        return _import_file(path)
    if not all(part.isidentifier() for part in text.split(".")):
        raise BadArgumentError(f"--model-code {text}: neither a .py file nor an importable module name")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. timm's "Overwriting NAME in registry": stderr stays one line
            return importlib.import_module(text)
    except ModuleNotFoundError as e:
        if e.name is not None and (text == e.name or text.startswith(e.name + ".")):
            raise BadArgumentError(f"--model-code {text}: no file {text} and no importable module of that name") \
                from e
        raise _fail(f"--model-code {text} failed to import", e, None) from e
    except Exception as e:  # whatever the user's module raises while importing
        raise _fail(f"--model-code {text} failed to import", e, None) from e


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise BadArgumentError(f"--model-code {path}: no such file (a .py file with your model, or a module name)")
    if path.suffix != ".py":
        raise BadArgumentError(f"--model-code {path}: not a .py file")
    resolved = path.resolve()
    stat = resolved.stat()
    cache_key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if cache_key in _IMPORTED:
        return _IMPORTED[cache_key]
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"collapse_probe_usercode_{resolved.stem if resolved.stem.isidentifier() else 'module'}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise BadArgumentError(f"--model-code {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(resolved.parent)
    sys.path.insert(0, folder)  # its siblings (from utils import ...) import as they do when the user runs it
    sys.modules[name] = module  # dataclasses and pickling look the module up while it executes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(module)
    except KeyboardInterrupt:
        sys.modules.pop(name, None)
        raise
    except BaseException as e:  # SystemExit too: a script that parses sys.argv at import time
        sys.modules.pop(name, None)
        raise _fail(f"--model-code {path} failed to import", e, str(resolved)) from e
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    _IMPORTED[cache_key] = module
    return module


def _origin(module: ModuleType) -> str | None:
    return getattr(module, "__file__", None)


def _registered(module: ModuleType) -> list[str]:
    """timm names the module registered with ``register_model`` (timm appends each to the module's ``__all__``)."""
    import timm

    names = [n for n in getattr(module, "__all__", []) if isinstance(n, str) and timm.is_model(n)]
    return [n for n in names if getattr(timm.models.model_entrypoint(n), "__module__", None) == module.__name__]


def candidates(module: ModuleType) -> list[str]:
    """What ``--model`` can name in ``module``: nn.Module classes and functions defined there, timm names it
    registered."""
    own = [n for n, obj in vars(module).items() if not n.startswith("_") and getattr(obj, "__module__", None) ==
           module.__name__ and ((inspect.isclass(obj) and issubclass(obj, nn.Module)) or inspect.isfunction(obj))]
    return sorted(set(own) | set(_registered(module)))


def find_factory(module: ModuleType, name: str | None, shown: str) -> tuple[Factory, str]:
    """(the callable ``name`` names in ``module`` or timm's registry, how to show it); ``shown``: the --model-code
    text, for messages."""
    import timm

    found = candidates(module)
    if not name:
        raise BadArgumentError(f"--model-code {shown} needs --model NAME, the class or function that builds your "
                               f"model (found: {', '.join(found) or 'no nn.Module class or function'})")
    if name in _registered(module):  # the entrypoint it registered, called as the user's own function
        return timm.models.model_entrypoint(name), f"timm:{name} (registered by {shown})"
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if obj is not None and callable(obj):
        return obj, f"{Path(shown).name}:{name}"
    if timm.is_model(name):  # any other timm name: timm's own factory builds it (with --model-args)
        return (lambda **kw: timm.create_model(name, pretrained=False, **kw)), f"timm:{name} (--model-code {shown})"
    raise BadArgumentError(f"--model {name}: no class or function of that name in {shown} (found: "
                           f"{', '.join(found) or 'no nn.Module class or function'})")


def parse_model_args(value: str | dict | None) -> dict[str, Any] | None:
    """``--model-args``: a JSON object (or a dict from the API) of keyword arguments; anything else exit 2."""
    if value is None or isinstance(value, dict):
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            raise BadArgumentError("model_args keys must be strings (argument names)")
        return value
    try:
        args = json.loads(value)
    except (json.JSONDecodeError, RecursionError, TypeError) as e:
        raise BadArgumentError(f"--model-args is not valid JSON ({one_line(e, 120)}); e.g. --model-args "
                               "'{\"depth\": 6, \"heads\": 8}'") from e
    if not isinstance(args, dict):
        raise BadArgumentError(f"--model-args must be a JSON object of keyword arguments, got a "
                               f"{type(args).__name__}; e.g. --model-args '{{\"depth\": 6}}'")
    return args


def call_factory(factory: Factory, args: dict[str, Any] | None, shown: str, origin: str | None = None,
                 seed: int | None = None) -> nn.Module:
    """``factory(**args)`` as an ``nn.Module``; an exception inside it is one line naming file:line. ``seed``: build
    under ``torch.manual_seed(seed)`` (the untrained twin); otherwise the caller's random state is left untouched."""
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if seed is not None:
                torch.manual_seed(seed)
            model = factory(**(args or {}))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # whatever the user's constructor raises, SystemExit included
        raise _fail(f"{shown}(**{json.dumps(args or {})}) raised", e, origin) from e
    if not isinstance(model, nn.Module):
        raise BadArgumentError(f"{shown} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@dataclass
class UserModel:
    """The user's factory bound to its arguments: ``build(seed)`` makes the model (again, for the untrained twin)."""

    code: str  # --model-code as given
    shown: str  # FILE:NAME, how reports name the architecture
    args: dict[str, Any]
    factory: Factory = field(repr=False)
    origin: str | None = None  # the module's file, for file:line in errors

    def build(self, seed: int | None = None) -> nn.Module:
        return call_factory(self.factory, self.args, self.shown, self.origin, seed)


def user_model(code: str | Path, name: str | None, args: str | dict | None) -> UserModel:
    """Import ``code`` and find ``name`` in it (nothing is built yet); ``args``: --model-args JSON or a dict."""
    parsed = parse_model_args(args) or {}
    module = import_code(code)
    factory, shown = find_factory(module, name, str(code))
    return UserModel(str(code), shown, parsed, factory, _origin(module))


def fit_wrapper(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with a wrapper prefix put back when the user's model itself has it (``self.model = ...``): the reader
    strips ``model.`` / ``module.`` shared by every key, which is the user's own attribute here."""
    expected = list(model.state_dict())
    for p in ("model.", "module.", "_orig_mod."):
        if expected and all(k.startswith(p) for k in expected) and not any(k.startswith(p) for k in sd):
            return {p + k: v for k, v in sd.items()}
    return sd


_SIZE = ("image_size", "img_size", "input_size", "resolution")
_CHANNELS = ("channels", "in_chans", "in_channels", "num_channels")


def _number(v: Any) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, (tuple, list)) and v and all(isinstance(x, int) for x in v):
        return int(v[-1])  # (H, W) or (C, H, W): square inputs are what we feed
    return None


def guess_input(model: nn.Module, args: dict[str, Any]) -> tuple[tuple[int, int, int] | None, str]:
    """(C, H, W) the user's model takes, and where that was read: ``args`` or model attributes named image_size /
    img_size / channels / in_chans ..., else the first Conv2d (channels, stride = patch) and a position embedding
    [1, T, D] (T = prefix tokens + a square grid)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    chans, size, where = None, None, []
    for source, get in (("--model-args", args.get), ("model attribute", lambda n: getattr(model, n, None))):
        if chans is None:
            chans = next((c for n in _CHANNELS if (c := _number(get(n))) is not None), None)
        if size is None:
            size = next((c for n in _SIZE if (c := _number(get(n))) is not None), None)
            where += [source] if size is not None else []
    if chans is None:
        chans = convs[0].in_channels if convs else 3
    if size is None and convs:
        stride = convs[0].stride[0]
        for name, p in model.named_parameters():
            if "pos" in name.lower() and p.ndim in (2, 3):
                tokens = int(p.shape[-2])
                grid = next((g for k in (1, 0, 2, 3, 4, 5) if (g := square_side(tokens - k))), None)
                if grid is not None:
                    size, where = grid * stride, [f"{name} {tuple(p.shape)} and the patch stride {stride}"]
                    break
    if size is None:
        return None, "not found"
    return (chans, size, size), where[0] if where else "model"


def check_runs(model: nn.Module, size: list[int], shown: str, origin: str | None) -> None:
    """One forward of a zero image of ``size``: a model that cannot take it fails here with one line, not later."""
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(torch.zeros(1, *size, device=device))
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise BadArgumentError(f"{shown} does not run on a [1, {', '.join(map(str, size))}] image ({type(e).__name__}: "
                               f"{one_line(e, 160)}{_where(e, origin)}); give its input size in --model-args "
                               "(image_size, channels) or as model attributes") from e
