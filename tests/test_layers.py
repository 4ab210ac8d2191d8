"""The layering of the package, read from the source with ``ast``: the spine imports no method, nothing in src
imports the CLI or the benchmarks, no module imports another top-level package's private names, the graph of
top-level packages has no cycle, and no function runs over 60 lines. Each checker is first shown to catch a
planted violation in a small synthetic package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SPINE = {"pipeline", "plugins", "registry", "latents", "text", "errors"}
RESOURCES = {"stablekit.default_model"}  # the embedded model's weights path and text encoder: the spine may load it
FACES = {"cli", "serve", "batch"}  # the faces: only other faces may import them
MAX_LINES = 60


def read_package(src: Path = SRC) -> dict[str, tuple[str, bool]]:
    """``{module name: (source, is a package __init__)}`` for every module of stablekit under `src`."""
    out = {}
    for path in sorted((src / "stablekit").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if init else parts)] = (path.read_text(), init)
    return out


def imports(name: str, source: str, package: bool, known: set[str]) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every import in `source` (module `name`), relative imports
    resolved; ``from pkg import sub`` of a module `sub` in `known` counts as an import of ``pkg.sub``."""
    base = name if package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = base.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (parent, node.module or "") if p)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in known else (module, alias.name, node.lineno))
    return out


def unit(module: str) -> str | None:
    """The top-level unit of a stablekit module (``edit`` for ``stablekit.edit.inversion``, ``stablekit`` for the
    root package), None outside stablekit."""
    parts = module.split(".")
    if parts[0] != "stablekit":
        return None
    return parts[1] if len(parts) > 1 else "stablekit"


def violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """Every breach of the import rules in `modules`, one line each."""
    known, found, edges = set(modules), [], {}
    for name, (source, package) in modules.items():
        me = unit(name)
        for target, imported, line in imports(name, source, package, known):
            other = unit(target)
            where = f"{name}:{line} imports {target}" + (f".{imported}" if imported else "")
            if target.split(".")[0] == "benchmarks" or other in FACES and me not in FACES:
                found.append(f"{where}: the faces (CLI, service) and the benchmarks sit above everything in src")
            if other is None or other == me:
                continue
            edges.setdefault(me, set()).add(other)
            if me in SPINE and other not in SPINE and target not in RESOURCES:
                found.append(f"{where}: the spine imports no method")
            private = [p for p in [*target.split("."), imported or ""] if p.startswith("_") and not p.endswith("__")]
            if private:
                found.append(f"{where}: private name {private[0]} of another package")
    return found + [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each node that lies on one (depth-first search), as the path around it."""
    out, done = [], set()

    def visit(node, path):
        if node in path:
            out.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(edges):
        visit(node, [])
    return out


def long_functions(files: dict[str, str], limit: int = MAX_LINES) -> list[str]:
    """``file:line name (n lines)`` of every function (or method) of more than `limit` lines."""
    out = []
    for path, source in files.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path}:{node.lineno} {node.name} ({n} lines)")
    return out


# ---------------------------------------------------------------- the checkers catch planted violations

PLANTED = {
    "stablekit": ("from . import edit, pipeline\n", True),
    "stablekit.errors": ("", False),
    "stablekit.pipeline": ("from .errors import E\nfrom .sampling.momentum import HB\n", False),
    "stablekit.sampling": ("", True),
    "stablekit.sampling.momentum": ("def f():\n    from ..cli import main\n", False),
    "stablekit.edit": ("from ..protect.core import _map\n", True),
    "stablekit.protect": ("from .. import edit\n", True),
    "stablekit.protect.core": ("import benchmarks.accel\n", False),
    "stablekit.eval": ("from ..errors import E\nfrom .. import default_model\n", True),
    "stablekit.default_model": ("", True),
    "stablekit.cli": ("from . import edit\nfrom .protect import core\n", False),
}


def test_the_import_checker_finds_each_planted_violation():
    found = violations(PLANTED)
    expected = [
        "stablekit.pipeline:2 imports stablekit.sampling.momentum.HB: the spine imports no method",
        "stablekit.sampling.momentum:2 imports stablekit.cli.main: the faces (CLI, service) and the benchmarks",
        "stablekit.edit:1 imports stablekit.protect.core._map: private name _map of another package",
        "stablekit.protect.core:1 imports benchmarks.accel: the faces (CLI, service) and the benchmarks",
        "import cycle: edit -> protect -> edit",
    ]
    for line in expected:
        assert any(f.startswith(line) for f in found), (line, found)
    assert len(found) == len(expected), found  # the allowed imports (errors, default_model, cli's) pass


def test_the_import_checker_passes_a_clean_package():
    clean = {k: v for k, v in PLANTED.items() if k in ("stablekit", "stablekit.errors", "stablekit.eval")}
    clean["stablekit.edit"] = ("from ..errors import E\nfrom ..latents import tree_map\n", True)
    clean["stablekit.pipeline"] = ("from .default_model import WEIGHTS\n", False)
    clean["stablekit.default_model"] = ("from ..latents import to_pil\n", True)
    clean["stablekit.latents"] = ("from .errors import E\n", False)
    assert violations(clean) == []


def test_the_length_checker_counts_whole_functions():
    def body(indent: str, n: int) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    short = "def short():\n" + body("    ", 59)  # 60 lines: allowed
    long = "class C:\n    @staticmethod\n    def long():\n" + body("        ", 60)  # 61 lines from its def
    assert long_functions({"m.py": short + "\n\n" + long}) == ["m.py:65 long (61 lines)"]


# ---------------------------------------------------------------- the package itself


def test_the_spine_knows_no_method_and_no_package_reaches_into_another():
    modules = read_package()
    assert SPINE <= {unit(m) for m in modules}, "a spine module is missing; update SPINE"
    assert violations(modules) == []


def test_no_function_is_longer_than_60_lines():
    files = {str(p.relative_to(ROOT)): p.read_text() for d in ("src", "benchmarks") for p in (ROOT / d).rglob("*.py")}
    assert long_functions(files) == []
