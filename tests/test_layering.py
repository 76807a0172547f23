"""The layering contract: `engine` and `quant` share only the shard format (SHARDS.md).

- `engine` never imports `quant` and `quant` never imports `engine` (static AST check of every
  module, including imports inside functions); neither imports `launch`.
- Importing either package does not import Ray (Ray is started only by a run) nor initialise CUDA.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"engine": {"quant", "launch", "benchmarks"}, "quant": {"engine", "launch", "benchmarks"}}


def imported_top_levels(source: str, package: str) -> set[str]:
    """Top-level package names a module imports; `package` is the module's dotted package (`quant.vit`),
    against which relative imports are resolved (one climbing above the top level is an escape)."""
    parts = package.split(".")
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level > len(parts):  # `from ..x import y` climbing out of the top-level package
                names.add("<relative-escape>")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        dotted = ".".join(path.relative_to(ROOT).parent.parts)
        bad = imported_top_levels(path.read_text(), dotted) & (FORBIDDEN[package] | {"<relative-escape>"})
        found += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(bad)]
    return found


@pytest.mark.parametrize("package", ["engine", "quant"])
def test_no_cross_imports(package: str) -> None:
    assert violations(package) == []


def test_checker_catches_a_cross_import() -> None:
    """The checker itself must see every import form a cross import could take."""
    for src in (
        "import quant",
        "from quant.reader import read_manifest",
        "def f():\n    import quant.models as m\n",
        "import importlib\nimportlib.import_module('quant.data')",
    ):
        assert "quant" in imported_top_levels(src, "engine"), src
    assert "<relative-escape>" in imported_top_levels("from ..quant import x", "engine")
    assert "<relative-escape>" in imported_top_levels("from ...quant import x", "engine.sub")
    assert imported_top_levels("from ..quantizers import fake_quant", "quant.vit") == set()


@pytest.mark.parametrize("package", ["engine", "quant"])
def test_import_pulls_in_no_ray_and_no_cuda(package: str) -> None:
    code = (
        f"import sys, json, {package}, importlib, pkgutil\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "import torch\n"
        "print(json.dumps({'ray': 'ray' in sys.modules, 'cuda': torch.cuda.is_initialized()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ray": False, "cuda": False}
