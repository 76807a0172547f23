"""No import cycles inside a package: each module can be read (and imported) after the ones it needs.

Parametrized over the packages: engine, quant and launch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.import_graph import cycles, import_graph, imported_modules


@pytest.mark.parametrize("package", ["engine", "quant", "launch"])
def test_package_has_no_import_cycle(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 1
    assert cycles(graph) == [], "import cycles (modules that import each other, directly or not)"


def test_checker_sees_function_level_and_relative_imports_but_not_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b\n",  # function level: counted
        "b.py": "from .sub import c\n",  # relative: pkg.sub.c
        "sub/__init__.py": "",
        "sub/c.py": "import importlib\nimportlib.import_module('pkg.a')\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nelse:\n    import pkg.e\n",
        "e.py": "from pkg.d import x\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph("pkg", root=tmp_path)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.e"}  # the TYPE_CHECKING branch is skipped, its else kept
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"], ["pkg.d", "pkg.e"]]
    assert imported_modules("from . import b", "pkg", True, {"pkg", "pkg.b"}) == {"pkg.b"}
