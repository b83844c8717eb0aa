"""The architecture holds: imports only go down the layers.

    cli                     flags, errors, one module per tool
    server                  the HTTP API of gpt2-server.py (cli/server.py runs it)
    tasks, hub              text work over a Model and an Encoder; released names -> directories
    model, encoder          the network and its file format; the BPE encoder
    util                    small pieces any layer may use

A module may import its own package and packages of lower layers, never a
package beside it or above it.  The only exceptions are the ``__main__``
shims of ``python -m model`` / ``python -m encoder``, which start a tool
of cli/.
"""
import ast

import pytest

from conftest import ROOT

LAYERS = {"util": 0, "encoder": 1, "model": 1, "hub": 2, "tasks": 2, "server": 3, "cli": 4}
SHIMS = {"model/__main__.py", "encoder/__main__.py"}


def _imports(path):
    """Top-level project packages a module imports (absolute or relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    own = path.relative_to(ROOT).parts[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(own if node.level else (node.module or "").split(".")[0])
    return {name for name in found if name in LAYERS}


def _modules():
    return sorted(p for package in LAYERS for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path):
    rel = str(path.relative_to(ROOT))
    if rel in SHIMS:
        return
    own = path.relative_to(ROOT).parts[0]
    wrong = sorted(name for name in _imports(path) if name != own and LAYERS[name] >= LAYERS[own])
    assert wrong == [], f"{rel} imports {wrong}: imports must only go down ({own} is layer {LAYERS[own]})"


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = ROOT / "model" / "_layering_probe.py"
    try:
        bad.write_text("import cli.common\nfrom tasks import generate\n", encoding="utf-8")
        assert _imports(bad) == {"cli", "tasks"}
    finally:
        bad.unlink()


def test_every_package_is_placed():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(LAYERS), packages
