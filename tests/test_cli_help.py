"""`stablekit --help` and every `stablekit CMD --help` import no method package (so neither torch nor diffusers):
the catalogue's names come from registry.INDEX, the other names and defaults the help texts show from
cli/defaults.py; both are checked here against what the library itself defines."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import stablekit
from stablekit.cli import COMMANDS, defaults
from stablekit.registry import ADAPTERS, CATALOGUE, INDEX, KINDS, Table

HEAVY = ("torch", "diffusers", "transformers", "numpy")
PROBE = """
import json, sys
from stablekit.cli import main
sys.argv = ["stablekit", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_imports_nothing_heavy(command):
    args = [command, "--help"] if command else ["--help"]
    run = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(args)], capture_output=True, text=True, check=True
    )
    assert run.stdout.startswith("Usage: stablekit")
    assert json.loads(run.stderr.strip().splitlines()[-1]) == []


def test_the_index_is_what_the_classes_register():
    filed = {kind: {} for kind in KINDS}
    for kind in KINDS:
        for name, path in INDEX[kind].items():
            module, _, attr = path.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            assert CATALOGUE[kind][name] is cls, (kind, name)
            filed[kind][name] = cls
    for package in stablekit.PACKAGES:  # every class a method package files is in the index
        importlib.import_module(f"stablekit.{package}")
    for kind in KINDS:
        assert dict(CATALOGUE[kind].classes) == filed[kind], f"add the {kind} class(es) to registry.INDEX"


def test_every_adapter_method_names_a_class_that_loads_its_files():
    for method, path in ADAPTERS.items():
        module, _, attr = path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr).load), method


def test_a_table_knows_its_names_before_importing_and_files_new_classes():
    table = Table("accel", {"late": "json:JSONDecoder"})
    assert "late" in table and list(table) == ["late"] and table.classes == {}
    assert table["late"] is json.JSONDecoder
    assert table.classes == {"late": json.JSONDecoder}
    table.file("extra", dict)
    assert list(table) == ["late", "extra"] and len(table) == 2
    with pytest.raises(ValueError, match="already dict"):
        table.file("extra", list)
    with pytest.raises(KeyError):
        table["missing"]
    table["extra"] = list  # as on a dict (monkeypatch.setitem)
    del table["late"]
    assert list(table) == ["extra"] and table["extra"] is list


def test_the_help_defaults_are_the_library_s():
    from stablekit import edit, protect, provenance
    from stablekit.pipeline import DEFAULT_MODEL
    from stablekit.protect import eot
    from stablekit.redteam import audit

    assert defaults.DEFAULT_MODEL == DEFAULT_MODEL
    assert defaults.FPR == provenance.FPR
    assert defaults.DEFENSES == audit.DEFENSES
    assert tuple(eot.TRANSFORMS) == defaults.EOT
    shown = {m: {k: v for k, v in d.items() if k in ("steps", "mode")} for m, d in protect.DEFAULTS.items()}
    assert defaults.PROTECTIONS == shown
    assert defaults.INVERSION_GUIDANCE == edit.GUIDANCE
    assert defaults.EDIT_GUIDANCE == edit.EDIT_GUIDANCE
    assert defaults.EDIT_STEPS == edit.EDIT_STEPS
    assert defaults.DECODERS == edit.DECODERS
    from stablekit.restore.compressed_sensing import CSConfig

    assert defaults.CS == {"steps": CSConfig.steps, "particles": CSConfig.particles}


def test_the_help_s_recipes_are_the_library_s():
    from stablekit.registry import signature_text
    from stablekit.train import RECIPES

    assert defaults.RECIPES == {name: (signature_text(cls), cls.paper) for name, cls in RECIPES.items()}
