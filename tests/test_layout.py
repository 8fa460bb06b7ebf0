"""The package's shape: layers without upward imports or circles, small modules, a fast --help, runnable examples.

    pytest tests/test_layout.py -q

The layers are written down here (lowest first); a module may import from its own layer or below. Every ``>>>`` example
in the package's docstrings runs (the README's blocks: tests/test_readme.py); the public face's ``probe`` gives the same
numbers as the ``similarity`` command.
"""
from __future__ import annotations

import ast
import doctest
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "collapse_probe"
LAYERS = [
    {"errors", "outputs", "_version"},  # 0: no imports of ours but each other
    {"models", "metrics", "distributed"},  # 1: our models, metrics, torchrun setup
    {"hooks"},  # 2: capture
    {"loading"},  # 3: read (+ safety), infer, build, images, info, save
    {"probing"},  # 4: the probe road and its result
    {"plots"},  # 5: figure functions over results
    {"reports"},  # 6: text, audit, figures
    {"train"},  # 7: the trainer
    {"cli", "__main__", "__init__"},  # 8: the commands and the package face
    {"integrations"},  # 9: callbacks for other trainers (optional dependencies); nothing of ours imports them
]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    comp = _component(module)
    return next(i for i, names in enumerate(LAYERS) if comp in names)


def _imports(module: str, path: Path) -> set[str]:
    """Every collapse_probe module ``module`` imports, at any depth of its code (function-level imports too)."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    known = _modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("collapse_probe"):
                continue
            for alias in node.names:  # "from . import models" imports the module collapse_probe.models
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known or f"{sub}.__init__" in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("collapse_probe"))
    return {m.removesuffix(".__init__") for m in found} - {module.removesuffix(".__init__")}


def _graph() -> dict[str, set[str]]:
    return {m.removesuffix(".__init__"): _imports(m, p) for m, p in _modules().items()}


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        _layer(module)  # StopIteration: a new top-level module or package needs its place in LAYERS


def test_no_import_runs_back_up() -> None:
    upward = [f"{src} -> {dst}" for src, dsts in _graph().items() for dst in dsts
              if _layer(dst if dst != "collapse_probe" else "collapse_probe.__init__") > _layer(src)]
    assert upward == []


def test_no_import_circle() -> None:
    graph, state, stack, circles = _graph(), {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert circles == []


def test_modules_are_small() -> None:
    big = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_help_imports_neither_torch_nor_timm() -> None:
    code = ("import sys; sys.argv = ['collapse-probe', '--help']\n"
            "from collapse_probe.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('\\nHEAVY', sorted(m for m in ('torch', 'timm', 'numpy', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "similarity" in out.stdout and out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_version_answers_without_torch() -> None:
    code = ("import sys; sys.argv = ['collapse-probe', '--version']\nfrom collapse_probe.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    import collapse_probe

    assert out.stdout.split() == ["collapse-probe,", "version", collapse_probe.__version__, "False"], out.stdout


def _doctest_modules() -> list[str]:
    return sorted(m for m, p in _modules().items() if ">>>" in p.read_text())


@pytest.mark.parametrize("module", _doctest_modules())
def test_docstring_examples_run(module: str, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # examples name the bundled checkpoints by their repository path
    mod = importlib.import_module(module.removesuffix(".__init__"))
    import torch

    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=flags)
    assert result.attempted > 0 and result.failed == 0


def test_package_face() -> None:
    import collapse_probe as cp

    for name in cp.__all__:
        assert getattr(cp, name) is not None
    assert issubclass(cp.BadArgumentError, cp.CollapseProbeError)
    assert (PACKAGE / "py.typed").is_file()
    with pytest.raises(AttributeError):
        cp.no_such_name  # noqa: B018


def test_library_probe_equals_the_similarity_command(tmp_path: Path) -> None:
    """No option on either side: the same default images (the digits the checkpoint was trained on), rank images,
    twin and settings, so the same JSON, summary and verdict included."""
    from click.testing import CliRunner

    import collapse_probe as cp
    from collapse_probe.cli import main

    ckpt = REPO / "checkpoints" / "vit_micro_d4.safetensors"
    lib = cp.probe(str(ckpt))
    assert isinstance(lib, cp.ProbeResult) and lib.baseline is not None and lib.settings["rank_images"] == 16
    out = tmp_path / "sim.json"
    res = CliRunner().invoke(main, ["similarity", str(ckpt), "-o", str(out)])
    assert res.exit_code == 0, res.output
    cli = json.loads(out.read_text())
    assert "digits" in cli["images"]["source"]  # both chose the set the checkpoint was trained on
    assert cli == json.loads(lib.to_json())  # same numbers, same settings, same summary
    assert cp.judge(lib)["verdict"] == cli["summary"]["verdict"]


def test_figures_accepts_every_loading_option_of_similarity() -> None:
    from collapse_probe.cli import main

    def options(command: str) -> set[str]:
        return {o for p in main.commands[command].params for o in p.opts if o.startswith("--")}

    shared = options("similarity") - {"--format", "--output"}
    assert shared <= options("figures"), shared - options("figures")
    assert shared <= options("audit") and shared <= options("compare")


def test_our_models_refuse_options_they_do_not_implement() -> None:
    import timm

    import collapse_probe.models  # noqa: F401

    for kw in ({"qk_norm": True}, {"proj_bias": False}, {"scale_attn_norm": True}, {"scale_mlp_norm": True}):
        with pytest.raises(ValueError, match="does not implement"):
            timm.create_model("vit_micro", depth=1, **kw)
    model = timm.create_model("vit_micro", depth=1)
    with pytest.raises(NotImplementedError, match="mask"):
        model.blocks[0](model._pos_embed(model.patch_embed(__import__("torch").randn(1, 3, 32, 32))),
                        attn_mask=__import__("torch").ones(1, 1))
