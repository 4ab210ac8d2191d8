"""Fine-tune a pipeline's UNet on images with captions: LoRA (a small adapter file) or full (a model folder).

    images, captions = read_folder("my_set")             # a.png + a.txt, ..., or a metadata.jsonl
    config = FinetuneConfig(mode="lora", steps=200)
    data = encode(pipe, images, captions)
    unet = finetune(pipe, data, config)                   # the EMA weights; the pipeline's own UNet is untouched
    run(pipe, "default", images, captions, config, Path("out"))   # resumable folder: a model or lora.safetensors

The step is the embedded model's training step made generic: the model's own noise schedule and prediction
type (epsilon or v), Min-SNR-5 loss weighting, 10% of captions dropped so classifier-free guidance keeps
working, AdamW with warm-up and cosine decay, gradient clipping and EMA weights, all from the shared loop
(:func:`stablekit.train.fit`), so a stopped run resumes step for step. LoRA trains rank-`rank` factors on the
attention and feed-forward projections of every transformer block (peft); full fine-tuning trains every UNet
tensor except those named `frozen` (a FreezeAsGuard mask, ``stablekit finetune --freeze-guard``).

A folder is a set of images (png, jpg, jpeg, webp), each with a same-named ``.txt`` caption, or a
``metadata.jsonl`` of ``{"file_name": ..., "text": ...}`` lines (the Hugging Face image-folder format). Every
image must have the model's native size.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import StablekitError
from .trainer import TrainConfig, WorldData, fit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MODES = ("lora", "full")
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}
LORA_FILE = "lora.safetensors"
RUN_FILE = "finetune.json"  # not train.json: a finetune folder needs no recipe restored on load


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA of `rank` or full fine-tuning, for `steps` AdamW steps of `batch` examples at `lr` (default: 1e-3 for
    LoRA, 1e-4 full) after `warmup` steps; `seed` draws every batch, noise and timestep; a checkpoint every
    `save_every` steps; `dropout`: the share of captions replaced by the empty one."""

    mode: str = "lora"
    rank: int = 4
    steps: int = 200
    batch: int = 8
    lr: float | None = None
    warmup: int = 10
    seed: int = 0
    save_every: int = 50
    dropout: float = 0.1

    def __post_init__(self):
        if self.mode not in MODES:
            raise StablekitError(f"mode '{self.mode}': choose one of {', '.join(MODES)}")
        if self.rank < 1:
            raise StablekitError(f"rank={self.rank}: must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise StablekitError(f"lr={self.lr}: must be more than 0")
        if not 0 <= self.dropout < 1:
            raise StablekitError(f"dropout={self.dropout}: must be in [0, 1)")
        self.train_config()  # steps, batch, warmup and save_every are checked there

    def train_config(self) -> TrainConfig:
        lr = self.lr or DEFAULT_LR[self.mode]
        return TrainConfig(
            steps=self.steps, batch=self.batch, lr=lr, warmup=self.warmup, seed=self.seed, save_every=self.save_every
        )


def _captions_of(folder: Path) -> dict[Path, str]:
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        out = {}
        for i, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    out[folder / row["file_name"]] = str(row["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise StablekitError(f'{meta}, line {i}: need {{"file_name": ..., "text": ...}}') from None
        return out
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise StablekitError(f"'{folder / missing[0]}' has no caption: add {Path(missing[0]).stem}.txt beside it")
    return {p: p.with_suffix(".txt").read_text().strip() for p in images}


def read_folder(folder: str | Path) -> tuple[list, list[str]]:
    """(RGB images, captions) of a fine-tuning folder, all of one size; a bad folder is one StablekitError line."""
    from ..latents import read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise StablekitError(f"training set '{folder}' is not a folder")
    pairs = _captions_of(folder)
    if not pairs:
        raise StablekitError(f"training set '{folder}' has no images with captions ({', '.join(IMAGE_SUFFIXES)})")
    absent = [p for p in pairs if not p.is_file()]
    if absent:
        raise StablekitError(f"image '{absent[0]}' named in the training set does not exist")
    images = [read_image(p) for p in pairs]
    odd = [(p, im.size) for p, im in zip(pairs, images, strict=True) if im.size != images[0].size]
    if odd:
        raise StablekitError(
            f"'{odd[0][0]}' is {odd[0][1][0]}x{odd[0][1][1]} but '{next(iter(pairs))}' is "
            f"{images[0].size[0]}x{images[0].size[1]}: give images of one size"
        )
    return images, list(pairs.values())


def native_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def encode(pipe, images: list, captions: list[str], batch: int = 32) -> WorldData:
    """The training set as scaled VAE latents and the pipeline's prompt embeddings (one per image)."""
    from ..latents import encode_image, to_tensor

    size = native_size(pipe)
    if not images:
        raise StablekitError("the training set is empty; give at least one image with a caption")
    if images[0].size != (size, size):
        w, h = images[0].size
        raise StablekitError(f"the training images are {w}x{h}; this model trains on {size}x{size} images")
    latents, text = [], []
    for i in range(0, len(images), batch):
        pixels = torch.stack([to_tensor(im) for im in images[i : i + batch]]) * 2 - 1
        latents.append(encode_image(pipe, pixels.to(pipe.device)).cpu())
        text.append(pipe.encode_prompt(captions[i : i + batch], pipe.device, 1, False)[0].cpu().half())
    uncond = pipe.encode_prompt([""], pipe.device, 1, False)[0][0].cpu().float()
    x0 = torch.cat(latents).float().contiguous()  # the VAE's latents come channels-last: a frozen first conv's
    # backward pass crashes on them (torch 2.13, CPU)
    return WorldData(x0, torch.arange(len(x0)), torch.cat(text), uncond, 1.0, list(captions))


def step_loss(unet, data: WorldData, scheduler_config, batch: int, dropout: float):
    """The loss of one random batch as a function of the generator: Min-SNR-5 weighted error of the model's
    prediction type (epsilon or v) at uniform timesteps, `dropout` of the captions emptied."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler_config)
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    v = sched.config.prediction_type == "v_prediction"
    device = next(unet.parameters()).device

    def loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data.latents), (batch,), generator=gen)
        x0 = data.latents[idx]
        cond = data.text[data.cap_idx[idx]].float()
        cond[torch.rand(batch, generator=gen) < dropout] = data.uncond
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(*(x.to(device) for x in (sched.add_noise(x0, noise, t), t, cond))).sample.float().cpu()
        target = sched.get_velocity(x0, noise, t) if v else noise
        w = snr[t].clamp(1.0, 5.0) / (snr[t] + 1) if v else snr[t].clamp(max=5.0) / snr[t]
        return (w * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()

    return loss


def check_frozen(unet, frozen) -> None:
    """A StablekitError if `frozen` names a tensor `unet` does not have (a mask made for another model)."""
    unknown = sorted(set(frozen) - {n for n, _ in unet.named_parameters()})
    if unknown:
        raise StablekitError(f"the freeze mask names '{unknown[0]}', which this UNet does not have")


def trainable(pipe, config: FinetuneConfig, frozen=()) -> torch.nn.Module:
    """A copy of the pipeline's UNet ready to train: with LoRA layers (those on `frozen` weights kept at zero
    change) or with every tensor but the `frozen` ones trainable."""
    from .students import add_lora

    check_frozen(pipe.unet, frozen)
    unet = copy.deepcopy(pipe.unet).float().train()
    if config.mode == "full":
        for n, p in unet.named_parameters():
            p.requires_grad_(n not in frozen)
        return unet
    add_lora(unet, config.rank)
    for n, p in unet.named_parameters():
        module = n.split(".lora_", 1)[0]
        if ".lora_" in n and f"{module}.weight" in frozen:
            p.requires_grad_(False)
    return unet


def finetune(pipe, data: WorldData, config: FinetuneConfig, checkpoint=None, frozen=(), progress=True):
    """The fine-tuned UNet's EMA weights (with LoRA layers in LoRA mode) after `config`'s steps on `data`,
    resumed from `checkpoint` if it exists; `pipe`'s own UNet is not changed."""
    torch.manual_seed(config.seed)
    unet = trainable(pipe, config, frozen)
    ema = copy.deepcopy(unet)
    loss = step_loss(unet, data, pipe.scheduler.config, config.batch, config.dropout)
    fit(unet, loss, config.train_config(), checkpoint, progress=progress, ema=ema)
    return ema.eval().requires_grad_(False)


def describe(model: str, captions: list[str], config: FinetuneConfig, frozen=()) -> dict:
    """The run's description for its folder's ``finetune.json``: a resumed run must match all but its budget."""
    import hashlib

    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("steps", "save_every")}
    params |= dict(model=model, images=len(captions), captions_sha256=digest, frozen=len(frozen))
    return {"recipe": "finetune", "params": params, "config": dataclasses.asdict(config.train_config())}


def export(pipe, ema, config: FinetuneConfig, out: Path, desc: dict) -> Path:
    """Write the result into `out`: ``lora.safetensors`` (LoRA) or the pipeline with the new UNet (full)."""
    from .lora_adapter import LoRAAdapter

    if config.mode == "lora":
        meta = {"model": desc["params"]["model"], "rank": str(config.rank), "steps": str(config.steps)}
        LoRAAdapter.from_peft(ema, meta).save(out / LORA_FILE)
        return out / LORA_FILE
    import shutil

    original = pipe.unet
    pipe.unet = ema
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        pipe.unet = original
    if pipe.text_encoder.__class__.__name__ == "BertModel":  # MiniLM loads from its package, as the default's
        shutil.rmtree(out / "text_encoder")
    return out


def run(pipe, model: str, images: list, captions: list[str], config: FinetuneConfig, out: Path, frozen=()) -> dict:
    """Fine-tune in run folder `out` (new, or this run's to resume: ``finetune.json`` and ``checkpoint.pt``) and
    write the result there; returns the run's description with what was written."""
    from .folder import check_folder

    desc = describe(model, captions, config, frozen)
    data = encode(pipe, images, captions)  # checks the images and the mask before anything is written
    check_frozen(pipe.unet, frozen)
    check_folder(out, desc, RUN_FILE)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(desc, indent=2))
    ema = finetune(pipe, data, config, out / "checkpoint.pt", frozen)
    desc["written"] = str(export(pipe, ema, config, out, desc))
    (out / RUN_FILE).write_text(json.dumps(desc, indent=2))
    return desc
