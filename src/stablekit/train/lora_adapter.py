"""A LoRA of a pipeline's UNet as a reversible weight edit: low-rank factors saved as safetensors (a small file),
added to the base weights while attached (``stablekit generate --adapter FILE`` or ``stablekit.use``).

    adapter = LoRAAdapter.from_peft(unet, meta={"base": "default"})   # a UNet trained with peft's LoRA layers
    adapter.save("style.safetensors")
    with stablekit.use(pipe, LoRAAdapter.load("style.safetensors")):
        image = pipe("a red circle on a gray background").images[0]

Each adapted weight ``W`` (a linear layer or a 1x1 convolution) becomes ``W + B A`` with the scale folded into
``B``; detaching restores ``W`` bit for bit, and a file made for another model is refused at attach time (a
weight it names is missing or has another shape).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import StablekitError
from ..plugins import WeightEdit

METHOD = "lora"


def delta(a: torch.Tensor, b: torch.Tensor, shape) -> torch.Tensor:
    """The weight change ``B A`` of factors `a` (r, in[, 1, 1]) and `b` (out, r[, 1, 1]) in the weight's `shape`."""
    return (b.flatten(1).float() @ a.flatten(1).float()).reshape(shape)


class LoRAAdapter(WeightEdit):
    """Low-rank factors ``{weight name: (A, B)}`` of a pipeline's weights; `meta` is saved with them."""

    name = "lora"

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict[str, str] | None = None):
        self.factors = factors
        shapes = {n: (b.shape[0], *a.shape[1:]) for n, (a, b) in factors.items()}
        super().__init__({n: delta(a, b, shapes[n]) for n, (a, b) in factors.items()}, dict(meta or {}, method=METHOD))

    @classmethod
    def from_peft(cls, unet, meta: dict[str, str] | None = None) -> LoRAAdapter:
        """The factors of every peft LoRA layer of `unet` (its active adapter), the scale folded into B."""
        factors = {}
        for name, module in unet.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                scale = module.scaling["default"]
                a = module.lora_A["default"].weight.detach().float().clone()
                b = module.lora_B["default"].weight.detach().float() * scale
                factors[f"unet.{name}.weight"] = (a, b.clone())
        if not factors:
            raise StablekitError("the UNet has no LoRA layers to save")
        return cls(factors, meta)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{n}.lora_A": a.contiguous() for n, (a, _) in self.factors.items()}
        tensors |= {f"{n}.lora_B": b.contiguous() for n, (_, b) in self.factors.items()}
        save_file(tensors, str(path), metadata=self.meta)

    @classmethod
    def load(cls, path: str | Path) -> LoRAAdapter:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise StablekitError(f"LoRA file '{path}' does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise StablekitError(f"'{path}' is not a readable safetensors file ({e})") from None
        if meta.get("method") != METHOD:
            raise StablekitError(f"'{path}' is not a LoRA from `stablekit finetune`")
        names = {k.rsplit(".", 1)[0] for k in tensors}
        return cls({n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in sorted(names)}, meta)
