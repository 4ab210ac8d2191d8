"""Real-image editing: invert with the source prompt, regenerate with the target prompt."""
from __future__ import annotations

from contextlib import nullcontext

from ..errors import StablekitError
from ..plugins import CallState, Plugin, use
from .core import decode, encode_prompts
from .inversion import Inversion, denoise, invert


def edit(pipe, image, source_prompt: str, target_prompt: str, method: str = "direct", controller: Plugin | None = None,
         steps: int = 50, guidance: float | None = None, **options):
    """Edit `image` (path, PIL image or tensor in [0, 1]) from `source_prompt` to `target_prompt`; a PIL image.

    The image is inverted under the source prompt with `method` (see :func:`.inversion.invert`, which
    takes `options`; an :class:`.inversion.Inversion` made under the source prompt may be passed as
    `image` instead, and is reused whatever `method`, `steps`, `guidance` and `options` say), then
    two branches are denoised together from the inverted noise along the method's reconstruction
    path: the source (prompt `source_prompt`; Direct Inversion adds its offsets here only) and the
    target (prompt `target_prompt`), whose result is returned.

    `controller`, a :class:`~stablekit.Plugin` (e.g. :class:`.prompt_to_prompt.PromptToPrompt`), is attached
    for the regeneration. It gets a fresh :class:`~stablekit.CallState` whose ``step`` counts the
    steps done (model batches are ``[uncond_src, uncond_tgt, cond_src, cond_tgt]`` when ``do_cfg``),
    and its ``on_step_end`` sees the ``[source, target]`` latents after every step.
    """
    if not isinstance(target_prompt, str):
        raise StablekitError(f"the target prompt must be a string, got {type(target_prompt).__name__}")
    if not isinstance(image, Inversion):
        inv = invert(pipe, image, source_prompt, method, steps, guidance, **options)
    elif image.prompt != source_prompt:
        raise StablekitError(f"the inversion was made under the prompt '{image.prompt}', not the source prompt "
                             f"'{source_prompt}'")
    else:
        inv = image
    call = CallState(do_cfg=inv.guidance != 1, prompt=[source_prompt, target_prompt],
                     num_steps=len(inv.schedule), timesteps=inv.schedule.timesteps)

    def on_step(i, latents):
        call.step = i + 1
        return controller.on_step_end(call, i, inv.schedule.timesteps[i], latents)

    with use(pipe, controller) if controller is not None else nullcontext():
        text = encode_prompts(pipe, [source_prompt, target_prompt], inv.latents[0])  # resets plugins' state
        if controller is not None:
            controller.reset(call)
        traj = denoise(pipe, inv, text, on_step if controller is not None else None)
    return decode(pipe, traj[-1, 1:])
