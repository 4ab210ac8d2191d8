"""Real-image editing: invert with the source prompt and regenerate with the target prompt, or InfEdit
(:mod:`.infedit`), which inverts nothing."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..errors import StablekitError
from ..latents import Schedule, decode, encode_image, encode_prompts
from ..plugins import CallState, Plugin, use
from . import edict, infedit
from .asymmetric_decoder import check_decoder, decode_edits
from .inversion import GUIDANCE, METHODS, Inversion, batch, denoise, invert, load_images, prompt_list

EDIT_METHODS = (*METHODS, "infedit")
EDIT_STEPS = {**dict.fromkeys(METHODS, 50), "infedit": infedit.STEPS}  # each paper's default
EDIT_GUIDANCE = {**GUIDANCE, "infedit": infedit.GUIDANCE}  # the target's, for InfEdit


def edit(
    pipe,
    image,
    source_prompt: str | list[str],
    target_prompt: str | list[str],
    method: str = "direct",
    controller: Plugin | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    strength: float | None = None,
    decoder: str = "vae",
    mask=None,
    **options,
):
    """Edit `image` (path, PIL image or tensor in [0, 1]) from `source_prompt` to `target_prompt`; a PIL image.
    Lists of images (of one size), source and target prompts edit the images together, one batch
    (see :mod:`.inversion`), and give a list of PIL images.

    With an inversion `method` the image is inverted under the source prompt (see
    :func:`.inversion.invert`, which takes `options`; an :class:`.inversion.Inversion` made under the
    source prompt may be passed as `image` instead, and is reused whatever `method`, `steps`,
    `guidance` and `options` say), then two branches are denoised together from the inverted noise
    along the method's reconstruction path: the source (prompt `source_prompt`; Direct Inversion
    adds its offsets here only) and the target (prompt `target_prompt`), whose result is returned.
    They regenerate the last `strength` of the schedule from the inversion's latents at that point
    (default: EDICT's paper 0.8, :data:`.edict.EDIT_STRENGTH`; the whole schedule for the others).
    With ``method="infedit"`` the branches are sampled by :func:`.infedit.sample` instead (`options`:
    ``source_guidance``, ``seed``, ``decoder_steps``); `guidance` is the target's.
    `steps` and `guidance` default to the method's paper (:data:`EDIT_STEPS`, :data:`EDIT_GUIDANCE`).

    ``decoder="asymmetric"`` (:mod:`.asymmetric_decoder`) keeps the source pixels outside `mask` (1: may change;
    default: where the branches' latents differ, :func:`.asymmetric_decoder.edit_mask`).

    `controller`, a :class:`~stablekit.Plugin` (e.g. :class:`.prompt_to_prompt.PromptToPrompt`, or for
    InfEdit :class:`.infedit.UnifiedAttentionControl`), is attached for the regeneration. It gets a
    fresh :class:`~stablekit.CallState` whose ``step`` counts the steps done (skipped ones included) and
    whose ``prompt`` lists the branches' prompts (model batches are ``[uncond branches, cond branches]`` when
    ``do_cfg``), and its ``on_step_end`` sees the latents of the branches after every step.
    """
    if method not in EDIT_METHODS:
        raise StablekitError(f"unknown editing method '{method}'; choose one of: {', '.join(EDIT_METHODS)}")
    targets = prompt_list(target_prompt, "target prompt")
    inv, images, sources = _sources(image, source_prompt, method)
    check_decoder(pipe, decoder, mask, images)
    if len(targets) != len(sources):
        raise StablekitError(
            f"{len(sources)} source prompts but {len(targets)} target prompts: give one of each per image"
        )
    steps = EDIT_STEPS[method] if steps is None else steps
    if method == "infedit":
        if strength is not None:
            raise StablekitError("InfEdit samples the whole schedule: it takes no strength")
        traj = _infedit(pipe, images, sources, targets, controller, steps, guidance, **options)
    else:
        start = _start(inv.method if inv else method, len(inv.schedule) if inv else int(steps), strength)
        if inv is None:
            inv = invert(pipe, images, sources, method, steps, guidance, **options)
        traj = _regenerate(pipe, inv, sources + targets, controller, start)
    out = _decode(pipe, traj[-1], len(targets), decoder, images, mask)
    return out[0] if isinstance(target_prompt, str) else out


def _decode(pipe, final: torch.Tensor, n: int, decoder: str, images, mask) -> list:
    """The last `n` rows of `final` (the targets) decoded; the asymmetric decoder also gets the first `n` (the
    sources) to find the edited region when no `mask` is given."""
    if decoder == "asymmetric":
        return decode_edits(pipe, final[:n], final[-n:], images, mask)
    return [decode(pipe, z[None]) for z in final[-n:]]


def _sources(image, source_prompt, method: str) -> tuple[Inversion | None, list | None, list[str]]:
    """(the given Inversion or None, the images or None, the source prompts), checked against each other."""
    if not isinstance(image, Inversion):
        images, sources = batch(image, source_prompt, "source prompt")
        return None, images, sources
    if method == "infedit":
        raise StablekitError("InfEdit inverts nothing: pass the image itself, not an Inversion")
    sources = prompt_list(source_prompt, "source prompt")
    if image.prompts != sources:
        raise StablekitError(
            f"the inversion was made under the prompt {image.prompt!r}, not the source prompt "
            f"{sources[0] if len(sources) == 1 else sources!r}"
        )
    return image, None, sources


def _regenerate(pipe, inv: Inversion, prompts: list[str], controller: Plugin | None, start: int) -> torch.Tensor:
    """The trajectory of the source and target branches denoised from `inv` along its reconstruction path."""
    return _controlled(
        pipe,
        controller,
        prompts,
        inv.latents[0],
        inv.schedule,
        inv.guidance != 1,
        lambda text, on_step: denoise(pipe, inv, text, on_step, start),
        start,
    )


def _start(method: str, steps: int, strength: float | None) -> int:
    """The first of `steps` steps that an edit by inversion `method` regenerates at `strength` (see :func:`edit`)."""
    if strength is None:
        strength = edict.EDIT_STRENGTH if method == "edict" else 1.0
    start = round((1 - float(strength)) * steps)
    if not 0 < strength <= 1 or start >= steps:
        raise StablekitError(
            f"strength must be in (0, 1] and leave at least one of the {steps} steps to regenerate (got {strength})"
        )
    return start


def _infedit(
    pipe,
    images,
    sources,
    targets,
    controller,
    steps,
    guidance,
    source_guidance: float = infedit.SOURCE_GUIDANCE,
    seed: int = 0,
    decoder_steps: int = 0,
) -> torch.Tensor:
    """InfEdit's trajectory (steps + 1, branches * images, C, h, w); the targets are the last branch."""
    if int(steps) < 1:
        raise StablekitError(f"need steps >= 1 (got steps={steps})")
    z0 = encode_image(pipe, load_images(pipe, images), decoder_steps)
    sched = Schedule(pipe, int(steps))
    branches = (
        [sources, sources, targets] if isinstance(controller, infedit.UnifiedAttentionControl) else [sources, targets]
    )
    scales = [float(source_guidance)] * (len(branches) - 1) + [
        infedit.GUIDANCE if guidance is None else float(guidance)
    ]
    generator = torch.Generator().manual_seed(int(seed))
    return _controlled(
        pipe,
        controller,
        sum(branches, []),
        z0,
        sched,
        any(s != 1 for s in scales),
        lambda text, on_step: infedit.sample(pipe, sched, z0, text, scales, generator, on_step),
    )


def _controlled(
    pipe, controller, prompts: list[str], latent, sched: Schedule, do_cfg: bool, run, start: int = 0
) -> torch.Tensor:
    """``run(text, on_step)`` for the branches' `prompts` (encoded for latents shaped like `latent`), with
    `controller` attached and reset, its ``on_step_end`` called after every step from `start` on; the trajectory."""
    call = CallState(do_cfg=do_cfg, prompt=prompts, step=start, num_steps=len(sched), timesteps=sched.timesteps)

    def on_step(i, latents):
        call.step = i + 1
        return controller.on_step_end(call, i, sched.timesteps[i], latents)

    with use(pipe, controller) if controller is not None else nullcontext():
        text = encode_prompts(pipe, prompts, latent)  # resets plugins' state
        if controller is not None:
            controller.reset(call)
        return run(text, on_step if controller is not None else None)
