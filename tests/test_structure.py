"""The tree's shape: packages, not filename prefixes; no import cycles; nothing at the top that shadows
an installed package when Python runs from the repository root."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "surgeon"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every surgeon module `path` imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", "")) == "TYPE_CHECKING"
                   for child in block.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> nx.DiGraph:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in imports(path):
            if target in modules and target != name and not name.startswith(target + "."):
                graph.add_edge(name, target)   # a module importing its own package's __init__ is no cycle
    return graph


def test_no_import_cycles_anywhere():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_no_module_is_named_with_another_modules_name_as_a_prefix():
    for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if (p / "__init__.py").is_file())]:
        names = sorted({p.stem for p in folder.glob("*.py") if p.stem != "__init__"} |
                       {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()})
        clashes = [(a, b) for a in names for b in names if a != b and b.startswith(a + "_")]
        if folder == PACKAGE:
            assert not clashes, f"surgeon/: modules named with another's name as a prefix: {clashes}"


def test_no_top_level_folder_is_a_package_but_surgeon_and_tests():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["surgeon", "tests"], packages


@pytest.mark.parametrize("name", ["kernels", "passes", "benchmarks", "scripts", "constraints", "docs"])
def test_an_installed_package_is_never_shadowed_by_a_folder_at_the_root(tmp_path, name):
    """PyPI's `kernels` (which transformers 5.25 needs) was shadowed by our kernels/ folder whenever Python ran
    from the root. A folder there must lose to any installed package of its name: here a stand-in one."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("INSTALLED = True\n")
    code = f"import {name}; print({name}.INSTALLED)"
    env = {**os.environ, "PYTHONPATH": str(site)}   # after the root, which `python -c` puts first
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert found.stdout.strip() == "True", found.stderr[-500:]


def test_the_package_imports_from_any_folder(tmp_path):
    code = "import surgeon, surgeon.passes, surgeon.kernels.lora_linear, surgeon.cli; print(surgeon.__file__)"
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(PACKAGE / "__init__.py")
