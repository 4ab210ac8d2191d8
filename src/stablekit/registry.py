"""The one catalogue of plugin kinds, and classes by name with keyword parameters from one line of text:
``NAME[:k=v[,k=v...]]``.

:data:`CATALOGUE` maps each kind (:data:`KINDS`) to a :class:`Table` (a read-only mapping) of classes keyed by
their ``name``; method modules file their classes with the :func:`register` decorator, and :data:`INDEX` lists where
each class of the package lives, so a name is known without importing anything and its class is imported on first
lookup. The command line and :func:`stablekit.load` read it::

    @register("accel")
    class DeepCache(StepCache):
        name = "deepcache"

    build("deepcache:interval=3,branch=1", CATALOGUE["accel"], "accel")   # -> DeepCache(interval=3, branch=1)
    parse("dpm++:solver_order=3", CATALOGUE["scheduler"], "scheduler")   # -> ("dpm++", cls, {"solver_order": 3})

A value is converted to what the parameter's annotation (or, without one, its default) allows: None
(``none``), int, float, bool (``true/false/yes/no/on/off/1/0``), one of a ``Literal``'s values, or str.
``[a,b,...]`` is a list (items int, float or str); a bare value for a list parameter is a one-item list.
Every mistake is one :class:`StablekitError` line that lists the valid names, or the parameters with their
defaults.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import types
import typing

from .errors import StablekitError

KINDS = ("scheduler", "accel", "guard", "watermark", "attack", "quant")
# kind -> name -> "module:attribute" of every class the package files in the catalogue, so that the names are known
# (for help texts, spec checks) without importing the method packages; tests/test_layers.py checks it against what
# the classes' @register decorators file. diffusers' own schedulers are filed here alone.
INDEX: dict[str, dict[str, str]] = {
    "scheduler": {
        "ddim": "diffusers:DDIMScheduler",
        "ddpm": "diffusers:DDPMScheduler",
        "pndm": "diffusers:PNDMScheduler",
        "plms": "diffusers:PNDMScheduler",
        "dpm++": "diffusers:DPMSolverMultistepScheduler",
        "dpmsolver": "diffusers:DPMSolverMultistepScheduler",
        "euler": "diffusers:EulerDiscreteScheduler",
        "euler-a": "diffusers:EulerAncestralDiscreteScheduler",
        "heun": "diffusers:HeunDiscreteScheduler",
        "lms": "diffusers:LMSDiscreteScheduler",
        "unipc": "diffusers:UniPCMultistepScheduler",
        "lcm": "diffusers:LCMScheduler",
        "hb": "stablekit.sampling.momentum:HBScheduler",
        "ghvb": "stablekit.sampling.momentum:GHVBScheduler",
        "hb-dpm++": "stablekit.sampling.momentum:HBDPMSolverScheduler",
        "searched": "stablekit.sampling.schedule_search:SearchedScheduler",
    },
    "accel": {
        "deepcache": "stablekit.accel.deepcache:DeepCache",
        "encoder-propagation": "stablekit.accel.encoder_propagation:EncoderPropagation",
        "feature-inheritance": "stablekit.accel.feature_inheritance:FeatureInheritance",
        "lcm-lora": "stablekit.accel.lcm:LCMLoRA",
        "multidiffusion": "stablekit.accel.multidiffusion:MultiDiffusion",
        "shifted-tiles": "stablekit.accel.shifted_tiles:ShiftedTiles",
    },
    "guard": {
        "safree": "stablekit.safety.safree:SAFREE",
        "sld": "stablekit.safety.sld:SLD",
        "uce": "stablekit.safety.uce:UCE",
    },
    "watermark": {
        "gaussian-shading": "stablekit.provenance.gaussian_shading:GaussianShading",
        "safe-sd": "stablekit.provenance.safe_sd:SafeSD",
        "seal": "stablekit.provenance.seal:SEAL",
        "tree-ring": "stablekit.provenance.tree_ring:TreeRing",
        "wouaf": "stablekit.provenance.wouaf:WOUAF",
    },
    "attack": {
        "arithmetic": "stablekit.redteam.arithmetic:ConceptArithmetic",
        "p4d": "stablekit.redteam.p4d:P4D",
        "unlearndiffatk": "stablekit.redteam.unlearndiffatk:UnlearnDiffAtk",
    },
    "quant": {
        "naive": "stablekit.quant.naive:Naive",
        "ptq4dm": "stablekit.quant.ptq4dm:PTQ4DM",
        "qdiffusion": "stablekit.quant.qdiffusion:QDiffusion",
        "quest": "stablekit.quant.quest:QuEST",
        "svdquant": "stablekit.quant.svdquant:SVDQuant",
    },
}


def _attribute(path: str):
    """The attribute named by ``"module:attribute"``, its module imported."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


# the "method" an adapter file's metadata names -> "module:Class" whose ``load(path)`` (with ``multiplier`` where
# the class scales its strength) opens it; `generate --adapter`, batch jobs and the audit read adapters through
# :func:`load_adapter`.
ADAPTERS: dict[str, str] = {
    "advunlearn": "stablekit.safety.advunlearn:AdvUnlearn",
    "doco": "stablekit.safety.doco:DoCo",
    "lora": "stablekit.train.lora_adapter:LoRAAdapter",
    "memcontrol": "stablekit.memorization.pruning:MemorizationAdapter",
    "nemo": "stablekit.memorization.pruning:NeuronPruning",
    "speedupnet": "stablekit.train.speedupnet:SpeedUpNet",
    "spm": "stablekit.safety.spm:SPM",
    "subspace": "stablekit.memorization.pruning:NeuronPruning",
    "trce": "stablekit.safety.trce:TRCE",
    "uce": "stablekit.safety.uce:UCE",
}


def load_adapter(path, multiplier: float = 1.0):
    """The plugin saved in the adapter file at `path` (a safetensors file whose metadata names its method, as
    ``stablekit erase`` and ``stablekit memorization mitigate`` write), its strength times `multiplier` where the
    method scales one."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise StablekitError(f"adapter file '{path}' does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            method = (f.metadata() or {}).get("method")
    except (SafetensorError, OSError) as e:
        raise StablekitError(f"'{path}' is not a readable safetensors file ({e})") from None
    if method not in ADAPTERS:
        raise StablekitError(
            f"'{path}' is not an adapter file (from `stablekit erase`, `stablekit finetune`, "
            "`stablekit memorization mitigate` or `stablekit distill --method speedupnet`)"
        )
    cls = _attribute(ADAPTERS[method])
    takes = "multiplier" in inspect.signature(cls.load).parameters
    return cls.load(path, multiplier) if takes else cls.load(path)


class Table(collections.abc.MutableMapping):
    """One kind's classes by name: the names of :data:`INDEX` (known without importing anything) and those filed by
    :func:`register`; a class of the index is imported on first lookup (``table[name]``, ``.items()``). Setting
    and deleting work as on a dict."""

    def __init__(self, kind: str, paths: dict[str, str]):
        self.kind = kind
        self.paths = dict(paths)
        self.classes: dict[str, type] = {}

    def __iter__(self):
        return iter(dict.fromkeys([*self.paths, *self.classes]))

    def __len__(self) -> int:
        return len(set(self.paths) | set(self.classes))

    def __contains__(self, name) -> bool:
        return name in self.paths or name in self.classes

    def __getitem__(self, name: str) -> type:
        if name not in self.classes and name in self.paths:
            self.classes[name] = _attribute(self.paths[name])
        return self.classes[name]

    def __setitem__(self, name: str, cls: type) -> None:
        self.classes[name] = cls

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.classes.pop(name, None)
        self.paths.pop(name, None)

    def __repr__(self) -> str:
        return f"Table({self.kind!r}, {list(self)})"

    def file(self, name: str, cls: type) -> None:
        """File `cls` under `name`; a name already taken by another class is refused."""
        if self.classes.get(name, cls) is not cls:
            raise ValueError(f"{self.kind} '{name}' is already {self.classes[name].__name__}, not {cls.__name__}")
        self.classes[name] = cls


CATALOGUE: dict[str, Table] = {kind: Table(kind, INDEX[kind]) for kind in KINDS}


def register(kind: str, name: str | None = None):
    """Class decorator: file the class in ``CATALOGUE[kind]`` under its ``name`` attribute, or under `name`
    (for classes of other libraries, and aliases). A name already taken by another class is refused. A class of
    the package is also listed in :data:`INDEX`, so that its name is known before its module is imported."""
    if kind not in CATALOGUE:
        raise ValueError(f"unknown plugin kind '{kind}'; the kinds are: {', '.join(KINDS)}")
    table = CATALOGUE[kind]

    def add(cls: type) -> type:
        key = name or getattr(cls, "name", None)
        if not isinstance(key, str) or not key:
            raise ValueError(f"{cls.__name__} has no name to be registered under as a {kind}")
        table.file(key, cls)
        return cls

    return add


BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_ORDER = {type(None): 0, int: 1, float: 2, bool: 3, list: 4, str: 6}  # Literal values come at 5


def _declared(target):
    """Where `target`'s parameters are declared: a plugin class's ``Config`` dataclass, else `target` itself."""
    config = getattr(target, "Config", None)
    return config if isinstance(target, type) and dataclasses.is_dataclass(config) else target


def parameters(target) -> dict[str, inspect.Parameter]:
    """The keyword parameters with defaults of `target` (a plugin class: its ``Config``; another class: its
    ``__init__``; or a function)."""
    return {
        n: p
        for n, p in inspect.signature(_declared(target)).parameters.items()
        if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _kinds(hint) -> list:
    """What a type hint allows among None/int/float/bool/str/list, plus Literal values; [] if it says nothing."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return [k for a in args for k in _kinds(a)]
    if origin is typing.Literal:
        return list(args)
    if hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        return [list]
    return [hint] if hint in _ORDER else []


def _allowed(target, name: str, default) -> list:
    target = _declared(target)
    try:
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # an annotation that does not evaluate says nothing usable
        hints = {}
    kinds = _kinds(hints[name]) if name in hints else []
    if not kinds and default is not None:
        kinds = [list] if isinstance(default, (list, tuple)) else _kinds(type(default))
    kinds = kinds or [type(None), int, float, bool, str]
    return sorted(dict.fromkeys(kinds), key=lambda k: _ORDER.get(k, 5) if isinstance(k, type) else 5)


def _scalar(text: str, kinds: list):
    for k in kinds:
        if k is type(None) and text.lower() == "none":
            return None
        if k in (int, float):
            try:
                return k(text)
            except ValueError:
                continue
        if k is bool and text.lower() in BOOLS:
            return BOOLS[text.lower()]
        if k is str:
            return text
        if not isinstance(k, type) and text == str(k):  # a Literal value
            return k
    raise ValueError(text)


def _value(text: str, kinds: list):
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(item.strip(), [int, float, str]) for item in _split(text[1:-1]) if item.strip()]
    scalars = [k for k in kinds if k is not list]
    try:
        return _scalar(text, scalars)
    except ValueError:
        if list in kinds:
            return [_scalar(text, [int, float, str])]
        raise


def _describe(kinds: list) -> str:
    names = {
        type(None): "none",
        int: "an int",
        float: "a number",
        bool: "true or false",
        list: "a list [a,b]",
        str: "text",
    }
    return " or ".join(names[k] if isinstance(k, type) else repr(k) for k in kinds)


def _split(text: str) -> list[str]:
    """`text` split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(format_value, value)) + "]"
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def signature_text(target) -> str:
    """``k=default, ...`` of `target`'s parameters, for error messages."""
    return ", ".join(f"{n}={format_value(p.default)}" for n, p in parameters(target).items()) or "none"


def parse(spec: str, registry: dict, what: str, target=lambda cls: cls) -> tuple[str, object, dict]:
    """``(name, registry[name], params)`` of ``NAME[:k=v,...]``; `target(cls)` is what the params are for
    (default: the class's ``__init__``)."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in registry:
        raise StablekitError(f"unknown {what} '{name}'; choose one of: {', '.join(registry)}")
    fn = target(registry[name])
    allowed, params = parameters(fn), {}
    for item in _split(rest) if rest.strip() else []:
        key, eq, text = (s.strip() for s in item.partition("="))
        if not eq or not key:
            raise StablekitError(f"{what} '{spec}': '{item.strip()}' is not k=v; write it like {name}:k=v,k2=v2")
        if key not in allowed:
            raise StablekitError(f"{what} {name} has no parameter '{key}'; its parameters: {signature_text(fn)}")
        if key in params:
            raise StablekitError(f"{what} '{spec}' sets {key} twice")
        kinds = _allowed(fn, key, allowed[key].default)
        try:
            params[key] = _value(text, kinds)
        except ValueError:
            raise StablekitError(
                f"{what} {name}: {key}={text!r} is not {_describe(kinds)} "
                f"(default {format_value(allowed[key].default)})"
            ) from None
    return name, registry[name], params


def build(spec: str, registry: dict, what: str):
    """``registry[NAME](**params)`` for ``NAME[:k=v,...]``; a constructor's complaint becomes one line."""
    name, cls, params = parse(spec, registry, what)
    try:
        return cls(**params)
    except StablekitError as e:
        raise StablekitError(f"{what} '{spec}': {e}") from None
    except (TypeError, ValueError) as e:
        raise StablekitError(f"{what} '{spec}': {e}; its parameters: {signature_text(cls)}") from None
