"""``stablekit bench NAME``: run benchmarks/NAME.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click

from ..errors import StablekitError


def benchmark_dirs() -> list[Path]:
    """Folders searched for benchmarks: ``./benchmarks``, then the source checkout's ``benchmarks/``."""
    dirs = []
    for d in (Path.cwd() / "benchmarks", Path(__file__).resolve().parents[3] / "benchmarks"):
        if d.is_dir() and d.resolve() not in dirs:
            dirs.append(d.resolve())
    return dirs


def find_benchmark(name: str) -> Path:
    """The file of benchmark `name` (``-`` read as ``_``), or a StablekitError listing those available."""
    found = {}
    for d in reversed(benchmark_dirs()):  # the first folder wins
        found.update({f.stem: f for f in d.glob("*.py") if not f.stem.startswith("_")})
    stem = name.removesuffix(".py").replace("-", "_")
    if stem not in found:
        raise StablekitError(f"unknown benchmark '{name}'; available: {', '.join(sorted(found)) or 'none'}")
    return found[stem]


def load_benchmark(name: str):
    """The module of benchmark `name`, imported (it has a ``main(args)``), with its folder on ``sys.path`` for the
    modules it shares with the other benchmarks (``benchmarks/_common.py``)."""
    path = find_benchmark(name)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"stablekit_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise StablekitError(f"benchmark '{path}' has no main(args) function")
    return module


_PASS_THROUGH = dict(ignore_unknown_options=True, allow_extra_args=True, allow_interspersed_args=False)


@click.command(context_settings=_PASS_THROUGH)
@click.argument("name")
@click.pass_context
def bench(ctx, name):
    """Run benchmarks/NAME.py's main(args) with the remaining ARGS (an int it returns is the exit code)."""
    return load_benchmark(name).main(list(ctx.args))
