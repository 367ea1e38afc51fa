"""The package's layering, checked on its source: who may import Ray, fsspec and the edges, and module size.

docs/ARCHITECTURE.md states the rules; this walks every import statement (module level and inside
functions) of every module under ``olss_dist/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "olss_dist"
MAX_LINES = 400
LONG_REASON = "Why this module is long:"
STORAGE = ("fsspec", "s3fs", "gcsfs")
EDGES = ("olss_dist.distributed", "olss_dist.artifacts", "olss_dist.apps", "olss_dist.cli", "olss_dist.models",
         "olss_dist.prompts", "olss_dist.method", "olss_dist.scheduler")


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "embedded" not in p.parts)


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names: set[str] = set()
    package = dotted(path) if path.name == "__init__.py" else dotted(path).rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offenders(selected: list[Path], forbidden: tuple[str, ...], top_level_only: bool = False) -> dict[str, list[str]]:
    found = {}
    for path in selected:
        bad = sorted(n for n in imports(path, top_level_only) if matches(n, forbidden))
        if bad:
            found[dotted(path)] = bad
    return found


def test_no_module_outside_distributed_imports_ray():
    outside = [p for p in modules() if "distributed" not in p.relative_to(PACKAGE).parts]
    assert offenders(outside, ("ray",)) == {}


def test_core_is_pure_maths():
    core = [p for p in modules() if p.relative_to(PACKAGE).parts[0] == "core"]
    assert len(core) >= 9
    assert offenders(core, ("ray", "torch.distributed", *STORAGE, *EDGES)) == {}


def test_method_imports_neither_ray_nor_storage():
    method = [p for p in modules() if p.relative_to(PACKAGE).parts[0] == "method"]
    assert method and offenders(method, ("ray", *STORAGE, "olss_dist.distributed", "olss_dist.artifacts", "olss_dist.apps")) == {}


def test_scheduler_imports_only_core_at_module_level():
    names = imports(PACKAGE / "scheduler.py", top_level_only=True)
    ours = {n for n in names if n.startswith("olss_dist")}
    assert ours and all(matches(n, ("olss_dist.core",)) for n in ours), ours


def test_spec_needs_neither_ray_nor_torch():
    assert offenders([PACKAGE / "spec.py"], ("ray", "torch"), top_level_only=True) == {}
    code = "import sys, olss_dist.spec, olss_dist.prompts; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_core_loads_without_ray():
    code = ("import sys, importlib, pkgutil, olss_dist.core as core\n"
            "for m in pkgutil.iter_modules(core.__path__): importlib.import_module('olss_dist.core.' + m.name)\n"
            "print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_short_or_says_why(path):
    lines = len(path.read_text().splitlines())
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or LONG_REASON in docstring, (
        f"{path.relative_to(PACKAGE)} has {lines} lines: split it, or state '{LONG_REASON} ...' in its docstring"
    )
