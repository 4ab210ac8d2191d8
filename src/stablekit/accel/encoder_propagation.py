"""Faster Diffusion: encoder propagation, the parallel decoder and prior noise injection.

"Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models" (2024).

Encoder features change gently between steps while decoder features do not. At a key step the whole UNet
runs and the encoder's outputs are stored; at the other steps the encoder (``conv_in``, the down blocks and
the mid block) returns them without running, and only the decoder (up blocks and output layers) runs, with
the current step's time embedding.

*Parallel decoder* (``parallel=True``). At a non-key step the decoder sees only the stored encoder features,
the step's time embedding and the text: nothing of the current latents. So the noise predictions of a key
step and of all the non-key steps up to the next key step are known once the key step's encoder has run, and
their decoders run as one batch: at the key step the UNet is called once with the batch repeated ``1 + m``
times (``m`` non-key steps follow), the encoder runs on the key step's rows only and its features are repeated,
and each block of rows gets its own step's timestep. The key step's block is returned; the others are kept and
returned, without running anything, by the UNet calls of the following steps, while the pipeline's own loop
applies guidance and the scheduler step by step as usual. Each block keeps the ``[uncond, cond]`` halves of
guidance together. The result equals sequential encoder propagation to float rounding (only the decoder's
batch size differs); the gain is fewer, larger decoder calls (on a GPU, parallel work).

*Prior noise injection* (``prior_noise=alpha``): before every step whose timestep is below
``prior_noise_below`` (tau), ``z_t <- z_t + alpha * z_T``, where ``z_T`` are the latents the sampling started
from (the output of the pipeline's ``prepare_latents``), to restore the texture detail that propagation
smooths away.

Defaults: the paper's non-uniform key steps ``0, 1, 2, 3, 5, 10, 15, 25, 35`` of 50 DDIM steps, or the
uniform 1:N variant (``interval=N``), or any key steps you give. The paper's full method (its code's demo) is
``EncoderPropagation(parallel=True, prior_noise=0.003)``; alpha = 0.003 and tau = 500 (``t / 1000 < 0.5``)
are the reference code's values. Both options are off by default: the parallel decoder trades memory (a
decoder batch up to 15 steps wide at the paper's key steps) for speed, and prior noise changes the output.

On the embedded default model (v-prediction, zero terminal SNR, 16x16 latents) the paper's key steps cost
much of the attribute accuracy (``stablekit bench accel --parts quality``; numbers in benchmarks/RESULTS.md):
they run the encoder last at step 35 of 50 and reuse it for the 14 steps after, and on this model those late
steps still need their own encoder. The uniform 1:2 and 1:3 variants keep its accuracy.
Key steps are a per-model choice: the auto-tuner measures it.

Deviations from the paper and its code:

* for a run of other than 50 steps the paper's key steps are scaled: step ``k`` becomes ``k * n // 50``
  (the code hard-codes the 50-step list, with separate hand-made rules for 75 and 100 steps);
* the code forks the pipeline's ``__call__`` to step through a batch of predictions; here the batch is made
  inside the key step's UNet call and handed out by the following UNet calls, so any scheduler, pipeline and
  plugin that keeps the standard loop works. A later call's inputs are checked against those the batch
  assumed (timestep, text embeddings, every other UNet argument); if any differ (a callback that edits the
  prompt embeddings, a scheduler whose model-call timesteps are not its ``timesteps``), that step runs its
  decoder itself, so the result never silently changes;
* ControlNet: the code skips the ControlNet at non-key steps too and reuses residuals baked into the stored
  features; here the pipeline still runs the ControlNet every step and its fresh residuals are added to the
  propagated features, so the control acts at every step (and the ControlNet costs what it did). A later
  step's residuals are not known at its key step, so with ControlNet the decoders run one step at a time;
* prior noise is added by a step callback after the previous step, so the UNet of the step sees it, as in the
  code's sequential pipeline (its parallel pipeline adds it after the key step's UNet call); the injection
  before the very first step (only when a run starts below tau: img2img with strength < 0.5) is not made,
  as no plugin seam reaches the latents before the first step. ``z_T`` for img2img is the noised image.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..errors import StablekitError
from ..plugins import settle
from ..registry import register
from .caching import StepCache, _ReplayHook, key_steps

PAPER_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)  # of 50 steps
RESIDUALS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


def _head(x, rows: int, reps: int):
    """`x` with every tensor batched `reps` times cut to its first `rows` rows (the key step's)."""
    if isinstance(x, torch.Tensor):
        return x[:rows] if x.ndim and x.shape[0] == rows * reps else x
    if isinstance(x, (tuple, list)):
        return type(x)(_head(v, rows, reps) for v in x)
    if isinstance(x, dict):
        return {k: _head(v, rows, reps) for k, v in x.items()}
    return x


def _tile(x, rows: int, reps: int):
    """`x` with every tensor of `rows` rows repeated `reps` times along the batch."""
    if isinstance(x, torch.Tensor):
        return x.repeat(reps, *[1] * (x.ndim - 1)) if x.ndim and x.shape[0] == rows else x
    if isinstance(x, (tuple, list)):
        return type(x)(_tile(v, rows, reps) for v in x)
    if isinstance(x, dict):
        return {k: _tile(v, rows, reps) for k, v in x.items()}
    return x


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool((a == b).all())
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _with_sample(out, sample: torch.Tensor):
    """A UNet output like `out` holding `sample`."""
    return (sample,) if isinstance(out, tuple) else type(out)(sample=sample)


class _SharedEncoderHook(_ReplayHook):
    """On an encoder module: in a batched key-step call, run on the key step's rows and repeat the output."""

    def new_forward(self, module, *args, **kwargs):
        rows, reps = self.plugin.rows, self.plugin.reps
        if reps == 1:
            return super().new_forward(module, *args, **kwargs)
        args, kwargs = _head((args, kwargs), rows, reps)
        return _tile(super().new_forward(module, *args, **kwargs), rows, reps)


@dataclass(frozen=True)
class EncoderPropagationConfig:
    """Key steps: uniform 1:`interval`, or (``interval=None``) `key_steps` written for `reference_steps` steps;
    the parallel decoder; prior noise `prior_noise` before the steps with a timestep below `prior_noise_below`."""

    interval: int | None = None
    key_steps: tuple[int, ...] = PAPER_KEY_STEPS
    reference_steps: int = 50
    parallel: bool = False
    prior_noise: float = 0.0
    prior_noise_below: float = 500

    def __post_init__(self):
        settle(self, key_steps=tuple(self.key_steps))
        if self.reference_steps < 1 or self.prior_noise < 0:
            raise StablekitError(
                f"encoder propagation: reference_steps must be >= 1 (got {self.reference_steps}) "
                f"and prior_noise >= 0 (got {self.prior_noise})"
            )
        self.steps(1)  # validates the key steps

    def steps(self, num_steps: int) -> list[int]:
        """The key steps of a run of `num_steps` steps."""
        if self.interval is None:
            return key_steps(num_steps, 1, self.key_steps, reference_steps=self.reference_steps)
        return key_steps(num_steps, self.interval)


@register("accel")
class EncoderPropagation(StepCache):
    """``EncoderPropagation()`` (the paper's key steps), ``EncoderPropagation(interval=4)`` (uniform 1:4), or
    ``EncoderPropagation(key_steps=[...], reference_steps=n)`` (your key steps, written for `n` steps);
    ``parallel=True`` batches the decoders of each key step and its non-key steps; ``prior_noise=0.003`` adds
    that much of the initial latents before every step with a timestep below `prior_noise_below`."""

    name = "encoder-propagation"
    replay_hook = _SharedEncoderHook
    Config = EncoderPropagationConfig

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self._signature = None

    def skipped_modules(self, unet):
        encoder = {"conv_in": unet.conv_in}
        encoder.update({f"down_blocks.{i}": block for i, block in enumerate(unet.down_blocks)})
        if unet.mid_block is not None:
            encoder["mid_block"] = unet.mid_block
        return encoder

    def attach(self, pipe):
        self._signature = inspect.signature(pipe.unet.forward)
        super().attach(pipe)

    def _clear(self):
        super()._clear()
        self.rows, self.reps, self._ahead = 0, 1, {}

    def _run_timesteps(self) -> torch.Tensor | None:
        """The timesteps of the steps this call runs, one per counted step."""
        n, ts = self._steps_run(), self.call.timesteps
        return ts[-n:] if n and ts is not None else None

    # parallel decoder
    def model_call(self, forward, args, kwargs):
        if not self.config.parallel:
            return forward(*args, **kwargs)
        inputs = self._signature.bind(*args, **kwargs).arguments
        expected, out = self._ahead.pop((self._step, self.slot), (None, None))
        if expected is not None and self._matches(expected, inputs):
            return out
        later = self._later_steps(inputs)
        return self._decode_ahead(forward, inputs, later) if later else forward(*args, **kwargs)

    @staticmethod
    def _matches(expected: dict, inputs: dict) -> bool:
        """Whether a UNet call's arguments are those its precomputed prediction assumed (its latents aside)."""
        return (
            expected.keys() == inputs.keys()
            and expected["sample"].shape == inputs["sample"].shape
            and all(_same(v, inputs[k]) for k, v in expected.items() if k != "sample")
        )

    def _later_steps(self, inputs: dict) -> list[int]:
        """The non-key steps whose decoders this key-step call can run too."""
        ts, step = self._run_timesteps(), self._step
        if (
            not self.full
            or self._keys is None
            or ts is None
            or not _same(inputs["timestep"], ts[step])
            or any(inputs.get(k) is not None for k in RESIDUALS)
        ):
            return []
        return list(range(step + 1, min([k for k in self._keys if k > step] + [len(ts)])))

    def _decode_ahead(self, forward, inputs: dict, later: list[int]):
        ts, rows, reps = self._run_timesteps(), inputs["sample"].shape[0], 1 + len(later)
        batch = {k: _tile(v, rows, reps) for k, v in inputs.items()}
        batch["timestep"] = ts[self._step : self._step + reps].to(inputs["sample"].device).repeat_interleave(rows)
        self.rows, self.reps = rows, reps
        try:
            out = forward(**batch)
        finally:
            self.rows, self.reps = 0, 1
        preds = out[0].split(rows)
        for step, pred in zip(later, preds[1:], strict=False):
            self._ahead[(step, self.slot)] = ({**inputs, "timestep": ts[step]}, _with_sample(out, pred))
        return _with_sample(out, preds[0])

    # prior noise injection
    def on_step_end(self, call, step, timestep, latents):
        ts, cfg = self._run_timesteps(), self.config
        if (
            cfg.prior_noise
            and call.initial_latents is not None
            and ts is not None
            and step + 1 < len(ts)
            and ts[step + 1] < cfg.prior_noise_below
        ):
            return latents + cfg.prior_noise * call.initial_latents
        return latents
