"""A quantized UNet as a plugin: :class:`Quantized` swaps the UNet's linear and convolution layers for quantized
ones while attached and puts the originals back on removal; it saves to and loads from a folder.

A quantized model folder holds ``quant.json`` (the method, bit-width, calibration settings, every layer's
layout, and the base model: its name and a SHA-256 fingerprint of its UNet weights) and ``quant.safetensors``
(codes, 4-bit ones packed two to a byte, scales, biases, activation ranges, smoothing and low-rank factors).
``stablekit.load(DIR)`` loads the base model it names and attaches the quantization; attaching it to a UNet
whose fingerprint differs is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers.hooks import ModelHook

from ..errors import StablekitError
from ..plugins import Plugin, unet_kwargs
from .core import ActQuantizer, QuantLayer, TimeContext

FORMAT = "stablekit-quant-1"
META_FILE, TENSOR_FILE = "quant.json", "quant.safetensors"


def fingerprint(unet: torch.nn.Module) -> str:
    """SHA-256 of the UNet's parameter names, shapes and float32 values."""
    h = hashlib.sha256()
    for name, p in sorted(unet.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def parent_of(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


class _TimeHook(ModelHook):
    """Tells the quantizers the timestep of each UNet call."""

    def __init__(self, context: TimeContext):
        super().__init__()
        self.context = context

    def pre_forward(self, module, *args, **kwargs):
        self.context.set(unet_kwargs(module, args, kwargs)["timestep"])
        return args, kwargs


class Quantized(Plugin):
    """The UNet's layers `layers` ({name: QuantLayer or int8 layer}) in place of the originals while attached;
    `meta`: method, bits, calibration, base model (``base.unet_sha256`` is checked on attach)."""

    name = "quantized"
    exclusive = ("unet layers",)

    def __init__(self, layers: dict[str, torch.nn.Module], meta: dict):
        super().__init__()
        self.layers, self.meta, self._orig = dict(layers), dict(meta), {}
        self.context = TimeContext(int(meta.get("train_steps", 1000)))
        for layer in self.layers.values():
            act = getattr(layer, "act", None)
            if isinstance(act, ActQuantizer):
                act.context = self.context

    def attach(self, pipe):
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise StablekitError("this pipeline has no UNet; a quantized UNet cannot attach to it")
        want = self.meta.get("base", {}).get("unet_sha256")
        if want and fingerprint(unet) != want:
            raise StablekitError(
                f"this quantized model was made from base model '{self.meta['base'].get('model')}', "
                "and the UNet given is a different one; load it with its own base model"
            )
        device = next(unet.parameters()).device
        for name, layer in self.layers.items():
            parent, attr = parent_of(unet, name)
            self._orig[name] = getattr(parent, attr)
            setattr(parent, attr, layer.to(device))
        self.add_hook(unet, _TimeHook(self.context))

    def detach(self, pipe):
        for name, orig in self._orig.items():
            parent, attr = parent_of(pipe.unet, name)
            setattr(parent, attr, orig)
        self._orig = {}

    # ---------------------------------------------------------------- reports

    def storage_bytes(self) -> int:
        """Bytes of the quantized layers' stored state."""
        return sum(b.numel() * b.element_size() for m in self.layers.values() for b in m.buffers())

    def execution(self) -> dict[str, int]:
        """How many layers run how: ``{"simulated": n, "int8 kernels": m}``."""
        out = {}
        for layer in self.layers.values():
            kind = "simulated" if isinstance(layer, QuantLayer) else "int8 kernels"
            out[kind] = out.get(kind, 0) + 1
        return out

    # ---------------------------------------------------------------- files

    def save(self, folder: str | Path) -> Path:
        """Write the folder (``quant.json`` + ``quant.safetensors``); layers must be simulated ones."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors, layout = {}, {}
        for name, layer in self.layers.items():
            if not isinstance(layer, QuantLayer):
                raise StablekitError("save the quantized model before converting it to int8 kernels")
            layout[name] = _layout(layer)
            for key, t in layer.state_dict().items():
                tensors[f"{name}::{key}"] = t.contiguous().cpu()
        folder.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, format=FORMAT, layers=layout)
        save_file(tensors, str(folder / (TENSOR_FILE + ".tmp")))
        (folder / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=1))
        for name in (TENSOR_FILE, META_FILE):  # the description last: a folder without it is no model
            os.replace(folder / (name + ".tmp"), folder / name)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Quantized:
        """The quantized model saved in `folder` (not attached)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = read_meta(folder)
        try:
            tensors = load_file(str(folder / TENSOR_FILE))
        except (SafetensorError, OSError) as e:
            raise StablekitError(f"'{folder / TENSOR_FILE}' is not a valid quantized model ({e})") from None
        layout = meta.pop("layers")
        layers = {name: _from_layout(spec, name, tensors) for name, spec in layout.items()}
        return cls(layers, meta)


def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StablekitError(f"'{path}' is not a quantized model description ({e})") from None
    if meta.get("format") != FORMAT:
        raise StablekitError(f"'{path}' has format {meta.get('format')!r}, not {FORMAT}")
    return meta


def _layout(layer: QuantLayer) -> dict:
    act = layer.act
    return {
        "kind": layer.kind,
        "shape": list(layer.shape),
        "wbits": layer.wbits,
        "conv": {k: list(v) if isinstance(v, tuple) else v for k, v in layer.cargs.items()},
        "act": None if act is None else {"bits": act.bits, "mode": act.mode, "split": act.split},
        "present": [k for k, v in layer.named_buffers(recurse=False) if v is not None],
    }


def _from_layout(spec: dict, name: str, tensors: dict) -> QuantLayer:
    def get(key):
        return tensors.get(f"{name}::{key}")

    a = spec["act"]
    act = None if a is None else ActQuantizer(a["bits"], a["mode"], get("act.lo"), get("act.hi"), split=a["split"])
    cargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["conv"].items()}
    layer = QuantLayer(
        spec["kind"], spec["shape"], spec["wbits"], torch.zeros(spec["shape"], dtype=torch.int8), get("scale"),
        get("bias"), act, cargs, get("smooth"), get("down"), get("up"), get("out_range"),
    )  # fmt: skip
    layer.codes = get("codes")  # stored as saved (packed at 4 bits)
    return layer


def load_folder(path: Path, device=None, dtype=None, scheduler=None):
    """``stablekit.load`` of a quantized model folder: its base model with the quantization attached."""
    from ..pipeline import load
    from ..plugins import use

    meta = read_meta(path)
    base = meta.get("base", {}).get("model")
    if not base:
        raise StablekitError(f"'{path / META_FILE}' names no base model")
    pipe = load(base, device=device, dtype=dtype, scheduler=scheduler)
    use(pipe, Quantized.load(path))
    return pipe
