"""What the compressed UNets share: a budget in multiply-accumulates, the cost of each removable layer, the
teacher's outputs with a layer removed, and retraining the smaller UNet by distillation from the teacher.

Every compressed model is the teacher's UNet with some layers removed (:mod:`.slim_unet`), initialised from the
teacher's weights and retrained on the embedded model's world renders (training side) with the teacher as
supervisor. The retraining loss is the sum of three terms, after BK-SDM ("On Architectural Compression of
Text-to-Image Diffusion Models", Kim et al., 2023), which the three papers build on:

* the task loss: the student's prediction against the true target (noise, velocity or sample, as the
  scheduler says) of the noised render;
* the output loss: the student's prediction against the frozen teacher's at the same input;
* the feature loss: the student's features against the teacher's at named modules (each method names its own),
  optionally each term divided by the mean square of the teacher's feature (LAPTOP-Diff's normalisation).

10% of the captions are replaced by the empty prompt, as in the teacher's own training, so that the student also
learns the unconditional prediction that classifier-free guidance needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import StablekitError, require_counts
from .slim_unet import SlimUNet2DConditionModel, parameters, removable_layers, removed
from .students import Stages, elapsed_minutes, fit, save_student, world_latents


@dataclass(frozen=True)
class Retrain:
    """The retraining of a compressed UNet: world renders, AdamW iterations and the loss weights."""

    images: int = 2048
    iterations: int = 400
    batch: int = 16
    lr: float = 1e-4
    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0
    uncond_prob: float = 0.1
    seed: int = 0

    def __post_init__(self):
        require_counts(self, ("images", "iterations", "batch"))
        if self.lr <= 0 or min(self.task_weight, self.output_weight, self.feature_weight) < 0:
            raise ValueError("lr must be > 0 and the loss weights >= 0")
        if not 0 <= self.uncond_prob < 1:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob}")


def check_teacher(pipe) -> None:
    unet = getattr(pipe, "unet", None)
    if unet is None or not removable_layers(unet):
        raise StablekitError("the model has no UNet with removable layers to compress")


@torch.no_grad()
def unet_macs(unet) -> int:
    """Multiply-accumulates of one UNet call on one latent (FLOPs / 2, counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = unet.config
    x = torch.zeros(1, c.in_channels, c.sample_size, c.sample_size, device=unet.device, dtype=unet.dtype)
    text = torch.zeros(1, 1, c.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=unet.device), text)
    return counter.get_total_flops() // 2


def layer_savings(unet) -> dict[str, int]:
    """The multiply-accumulates each removable layer's removal saves (additive: the layers do not overlap)."""
    full = unet_macs(unet)
    slim = SlimUNet2DConditionModel.from_unet
    return {name: full - unet_macs(slim(unet, [name])) for name in removable_layers(unet)}


def noised_batch(pipe, data, n: int, seed: int, uncond_prob: float = 0.0):
    """`n` noised training latents at uniform timesteps: (x_t, t, text embeddings, the model's target: noise,
    velocity or sample, as its scheduler's ``prediction_type``)."""
    g = torch.Generator("cpu").manual_seed(seed)
    idx = torch.randint(0, len(data), (n,), generator=g)
    _, cond, x0 = data.batch(idx)
    return noise_at(pipe, x0, cond, g, uncond_prob)


def noise_at(pipe, x0, cond, g, uncond_prob: float):
    acp = pipe.scheduler.alphas_cumprod.float()
    b = len(x0)
    t = torch.randint(0, len(acp), (b,), generator=g)
    a = acp[t].view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    drop = (torch.rand(b, generator=g) < uncond_prob).view(-1, 1, 1)
    if drop.any():
        cond = torch.where(drop, empty_prompt(pipe).expand_as(cond), cond)
    targets = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond, targets[pipe.scheduler.config.prediction_type]


def empty_prompt(pipe) -> torch.Tensor:
    return pipe.encode_prompt([""], "cpu", 1, False)[0].float()


class Taps:
    """The outputs of named submodules of a model, kept from its last forward pass (forward hooks)."""

    def __init__(self, model, names: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.values[name] = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        values = self.values
        self.values = {}
        return values

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def distillation_loss(pipe, features: list[str], config: Retrain, normalize: bool):
    """The loss of :func:`.students.fit` for a student UNet: task + output + (normalised) feature distillation
    from `pipe`'s UNet, the frozen teacher, at the features `features` (module names both UNets have); its
    ``release()`` removes the hooks it placed."""
    teacher = pipe.unet
    teacher_taps = Taps(teacher, features)
    student_taps: dict[int, Taps] = {}

    def loss(unet, _noise, cond, x0, g):
        taps = student_taps.setdefault(id(unet), Taps(unet, features))
        x_t, t, cond, v = noise_at(pipe, x0, cond, g, config.uncond_prob)
        with torch.no_grad():
            target = teacher(x_t, t, cond).sample
        out = unet(x_t, t, cond).sample
        total = config.task_weight * (out - v).pow(2).mean() + config.output_weight * (out - target).pow(2).mean()
        ours = taps.take()
        for name, ref in teacher_taps.take().items():
            term = (ours[name] - ref).pow(2).mean()
            total = total + config.feature_weight * (term / ref.pow(2).mean().clamp_min(1e-8) if normalize else term)
        return total

    loss.release = lambda: [taps.remove() for taps in (teacher_taps, *student_taps.values())]  # the hooks
    return loss


def retrain(pipe, student, features: list[str], config: Retrain, normalize: bool, stage: Stages) -> None:
    """Retrain `student` (in place) by distillation from `pipe`'s UNet on world renders; a kept stage resumes."""
    pipe.unet.requires_grad_(False)
    pipe.unet.eval()

    def run():
        data = world_latents(pipe, config.images, config.seed)
        loss = distillation_loss(pipe, features, config, normalize)
        common = dict(batch=config.batch, lr=config.lr, seed=config.seed)
        try:
            return fit(student, loss, data, iterations=config.iterations, desc="retrain", **common)
        finally:
            loss.release()

    stage.train("retrain", student, run)


def cached_json(stage: Stages, name: str, make):
    """`make()` (a JSON value), kept in the work folder of `stage` as NAME.json when it has one."""
    path = None if stage.dir is None else Path(stage.dir) / f"{name}.json"
    if path is not None and path.exists():
        return json.loads(path.read_text())
    value = make()
    if path is not None:
        path.write_text(json.dumps(value))
    return value


def summary(pipe, student, t0: float) -> dict:
    """What the recipe records of every compressed model: the removed layers, parameters and MACs against the
    teacher's, and the minutes the run took."""
    return {
        "removed_layers": removed(student),
        "parameters": parameters(student),
        "teacher_parameters": parameters(pipe.unet),
        "macs": unet_macs(student),
        "teacher_macs": unet_macs(pipe.unet),
        "minutes_this_run": elapsed_minutes(t0),
    }


def save(pipe, student, out: Path, recipe: dict) -> Path:
    """Write the teacher's pipeline with `student` as its UNet to the folder `out` (see :func:`.save_student`)."""
    teacher = pipe.unet
    pipe.unet = student.eval()
    try:
        return save_student(pipe, out, recipe)
    finally:
        pipe.unet = teacher


__all__ = ["Retrain", "Taps", "distillation_loss", "layer_savings", "retrain", "save", "summary", "unet_macs"]
