"""The plugin mechanism: methods attach to a standard diffusers pipeline through its own seams.

A :class:`Plugin` uses one or more seams:

* module hooks -- ``self.add_hook(module, hook)`` registers a diffusers ``ModelHook``;
* scheduler -- :class:`SchedulerPlugin` swaps ``pipe.scheduler`` and restores it;
* prompt embeddings -- override :meth:`Plugin.transform_embeds`;
* initial latents -- override :meth:`Plugin.make_latents` (text-to-image);
* step callbacks -- override :meth:`Plugin.on_step_end` (runs after every ``scheduler.step``,
  like ``callback_on_step_end``, but without taking that argument away from the user);
* weight edits -- :class:`WeightEdit`, a reversible parameter delta saved as safetensors.

A plugin's parameters are its ``Config``, a frozen dataclass that validates in ``__post_init__``: the plugin
is built from the parameters (``DeepCache(interval=3)``) or from a config (``DeepCache(DeepCacheConfig(...))``),
keeps it as ``plugin.config``, and its repr lists it. State that changes during a call lives on the plugin.

``use(pipe, *plugins)`` attaches them and returns a handle whose ``remove()`` (or the end of a
``with`` block) restores the pipeline exactly. The pipeline is then called as usual. At the start of
every call each plugin's :meth:`Plugin.reset` receives a fresh :class:`CallState`, whose ``step``
counts completed scheduler steps (never looked up from the timestep value), whose ``do_cfg``
says whether model batches are ``[uncond, cond]`` halves, and whose ``initial_latents`` are the
latents the sampling loop starts from (read-only: plugins that set them use ``make_latents``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .errors import StablekitError


@dataclass
class CallState:
    """What plugins share during one pipeline call; a new one is made for every call."""

    do_cfg: bool = False  # model inputs are [uncond, cond] halves along the batch
    prompt: object = None
    negative_prompt: object = None
    step: int = 0  # scheduler steps completed so far in this call
    num_steps: int | None = None
    timesteps: torch.Tensor | None = None
    initial_latents: torch.Tensor | None = None  # what the pipeline's prepare_latents returned
    scratch: dict = field(default_factory=dict)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(uncond, cond) parts of a model batch; uncond is None without guidance."""
        return tuple(x.chunk(2)) if self.do_cfg else (None, x)


@dataclass(frozen=True)
class NoConfig:
    """The config of a plugin without parameters."""


def settle(config, **values) -> None:
    """In a frozen config's ``__post_init__``: store the normalized `values` (say, a list as a tuple)."""
    for name, value in values.items():
        object.__setattr__(config, name, value)


def config_text(config) -> str:
    """``k=v, ...`` of a config's fields, as its repr shows them."""
    return ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config) if f.repr)


class Plugin:
    """Base class; subclasses set ``Config`` (their parameters) and override only the seams they use."""

    name = "plugin"
    exclusive: tuple[str, ...] = ()  # resources at most one attached plugin may claim
    outermost = False  # its hooks wrap every other plugin's (it splits each model call into several)
    Config: type = NoConfig  # a frozen dataclass of the parameters, validating in __post_init__

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        params = inspect.signature(cls.__init__).parameters.values()
        generic = all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in list(params)[1:])
        cls.__signature__ = inspect.signature(cls.Config) if generic else None  # what help() shows

    def __init__(self, *args, **params):
        self.config = self.configure(*args, **params)
        self.call = CallState()
        self._hooks: list[tuple[torch.nn.Module, str]] = []

    @classmethod
    def configure(cls, *args, **params):
        """A ``cls.Config``: the one given, or one made from the parameters."""
        if len(args) == 1 and not params and isinstance(args[0], cls.Config):
            return args[0]
        return cls.Config(*args, **params)

    # life cycle
    def attach(self, pipe) -> None:
        """Install module hooks or weight edits; called once by :func:`use`."""

    def detach(self, pipe) -> None:
        """Undo what :meth:`attach` did besides hooks (which are removed for you)."""

    def reset(self, call: CallState) -> None:
        """Start of a pipeline call: drop all per-call state."""
        self.call = call

    # seams
    def transform_embeds(self, call, prompt_embeds, negative_prompt_embeds):
        return prompt_embeds, negative_prompt_embeds

    def make_latents(self, call, shape, generator, dtype, device):
        """Initial latents of `shape` (before the scheduler's init_noise_sigma scaling), or None."""
        return None

    def on_step_end(self, call, step: int, timestep, latents):
        return latents

    # helpers
    def add_hook(self, module: torch.nn.Module, hook: ModelHook) -> None:
        name = f"stablekit:{self.name}:{id(self)}"
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._hooks.append((module, name))

    def _remove_hooks(self) -> None:
        for module, name in self._hooks:
            module._diffusers_hook.remove_hook(name, recurse=False)
        self._hooks.clear()

    def __repr__(self):
        return f"{type(self).__name__}({config_text(self.config)})"


def _overrides(plugin: Plugin, method: str) -> bool:
    return getattr(type(plugin), method) is not getattr(Plugin, method)


def _claims(plugin: Plugin) -> set[str]:
    return set(plugin.exclusive) | ({"initial latents"} if _overrides(plugin, "make_latents") else set())


def _forward_to(fn, original):
    """A function calling `fn` that shows `original`'s signature to ``inspect``."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class _Session:
    """All plugins attached to one pipeline, and the wrappers that route the pipeline's calls to them."""

    WRAPPED = ("encode_prompt", "prepare_latents")

    def __init__(self, pipe):
        self.pipe, self.plugins, self.call, self._scheduler = pipe, [], CallState(), None

    # wrappers installed as instance attributes, so removal restores the class's own methods
    def _install(self):
        pipe = self.pipe
        for name in self.WRAPPED:
            if hasattr(type(pipe), name):
                setattr(pipe, name, getattr(self, "_" + name))
        self._scheduler = sch = pipe.scheduler
        # keep the originals' signatures: pipelines inspect them to decide which kwargs to pass
        sch.set_timesteps = _forward_to(self._set_timesteps, sch.set_timesteps)
        sch.step = _forward_to(self._step, sch.step)

    def _uninstall(self):
        for name in self.WRAPPED:
            self.pipe.__dict__.pop(name, None)
        if self._scheduler is not None:
            self._scheduler.__dict__.pop("set_timesteps", None)
            self._scheduler.__dict__.pop("step", None)
            self._scheduler = None

    def _begin_call(self, prompt=None, negative_prompt=None):
        self.call = CallState(
            do_cfg=bool(getattr(self.pipe, "do_classifier_free_guidance", False)),
            prompt=prompt,
            negative_prompt=negative_prompt,
        )
        for p in self.plugins:
            p.reset(self.call)

    def _encode_prompt(self, *args, **kwargs):
        fn = type(self.pipe).encode_prompt
        bound = inspect.signature(fn).bind(self.pipe, *args, **kwargs).arguments
        self._begin_call(bound.get("prompt"), bound.get("negative_prompt"))
        out = fn(self.pipe, *args, **kwargs)
        pe, npe = out[0], out[1]
        for p in self.plugins:
            pe, npe = p.transform_embeds(self.call, pe, npe)
        return (pe, npe) + tuple(out[2:])

    def _prepare_latents(self, *args, **kwargs):
        fn = type(self.pipe).prepare_latents
        bound = inspect.signature(fn).bind(self.pipe, *args, **kwargs).arguments
        makers = [p for p in self.plugins if _overrides(p, "make_latents")]
        if makers and bound.get("latents") is None and "image" not in bound:
            f = self.pipe.vae_scale_factor
            shape = (
                bound["batch_size"],
                bound["num_channels_latents"],
                int(bound["height"]) // f,
                int(bound["width"]) // f,
            )
            bound["latents"] = makers[0].make_latents(
                self.call, shape, bound["generator"], bound["dtype"], bound["device"]
            )
        bound.pop("self")
        out = fn(self.pipe, **bound)
        self.call.initial_latents = out if isinstance(out, torch.Tensor) else out[0]
        return out

    def _set_timesteps(self, *args, **kwargs):
        if self.call.step:  # a new call that did not go through encode_prompt
            self._begin_call()
        out = type(self._scheduler).set_timesteps(self._scheduler, *args, **kwargs)
        self.call.timesteps = self._scheduler.timesteps
        self.call.num_steps = len(self._scheduler.timesteps)
        return out

    def _step(self, model_output, timestep, sample, *args, **kwargs):
        out = type(self._scheduler).step(self._scheduler, model_output, timestep, sample, *args, **kwargs)
        step = self.call.step
        self.call.step += 1
        latents = out[0] if isinstance(out, tuple) else out.prev_sample
        for p in self.plugins:
            latents = p.on_step_end(self.call, step, timestep, latents)
        if isinstance(out, tuple):
            return (latents,) + tuple(out[1:])
        out.prev_sample = latents
        return out

    def add(self, plugins):
        taken = {c: p for p in self.plugins for c in _claims(p)}
        for p in plugins:
            if not isinstance(p, Plugin):
                raise StablekitError(f"{p!r} is not a stablekit plugin")
            if any(p is q for q in self.plugins):
                raise StablekitError(f"{p!r} is already attached to this pipeline")
            for c in _claims(p):
                if c in taken:
                    raise StablekitError(f"{p!r} conflicts with {taken[c]!r}: both set the {c}; attach only one")
                taken[c] = p
        self._uninstall()
        outer = [p for p in self.plugins if p.outermost] if not all(p.outermost for p in plugins) else []
        for p in outer:  # re-attached after the new ones, so that their hooks stay outermost
            p._remove_hooks()
            p.detach(self.pipe)
            self.plugins.remove(p)
        done = []
        try:
            for p in sorted(plugins, key=lambda p: p.outermost) + outer:
                p.attach(self.pipe)
                done.append(p)
                self.plugins.append(p)
        except Exception:
            self.remove(done)
            raise
        finally:
            if self.plugins:
                self._install()

    def remove(self, plugins):
        self._uninstall()
        for p in reversed(plugins):
            if any(p is q for q in self.plugins):
                p._remove_hooks()
                p.detach(self.pipe)
                self.plugins = [q for q in self.plugins if q is not p]
        if self.plugins:
            self._install()
        else:
            self.pipe.__dict__.pop("_stablekit", None)


class Attached:
    """Handle returned by :func:`use`: ``remove()`` or leave the ``with`` block to detach."""

    def __init__(self, session: _Session, plugins: list[Plugin]):
        self.session, self.plugins = session, plugins

    def remove(self):
        self.session.remove(self.plugins)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def use(pipe, *plugins: Plugin) -> Attached:
    """Attach `plugins` to `pipe` (stackable; conflicts are reported here, before anything changes)."""
    session = pipe.__dict__.get("_stablekit")
    if session is None:
        session = _Session(pipe)
        pipe.__dict__["_stablekit"] = session
    session.add(list(plugins))
    return Attached(session, list(plugins))


def attached(pipe) -> list[Plugin]:
    """The plugins currently attached to `pipe`."""
    session = pipe.__dict__.get("_stablekit")
    return list(session.plugins) if session else []


@dataclass(frozen=True)
class SchedulerConfig:
    """A scheduler class and the values that override the pipeline's scheduler config."""

    scheduler: type
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.scheduler, type) and hasattr(self.scheduler, "from_config")):
            raise StablekitError(f"SchedulerPlugin needs a diffusers scheduler class, got {self.scheduler!r}")
        settle(self, overrides=dict(self.overrides))


class SchedulerPlugin(Plugin):
    """Seam: the scheduler. Replaces ``pipe.scheduler`` with `scheduler_cls` built from its config."""

    exclusive = ("scheduler",)
    Config = SchedulerConfig

    def __init__(self, scheduler_cls, **overrides):
        super().__init__(scheduler_cls, overrides)
        self._old = None
        self.name = self.config.scheduler.__name__

    def attach(self, pipe):
        self._old = pipe.scheduler
        pipe.scheduler = self.config.scheduler.from_config(pipe.scheduler.config, **self.config.overrides)

    def detach(self, pipe):
        pipe.scheduler = self._old

    def __repr__(self):
        items = [self.config.scheduler.__name__] + [f"{k}={v!r}" for k, v in self.config.overrides.items()]
        return f"SchedulerPlugin({', '.join(items)})"


class WeightEdit(Plugin):
    """Seam: weight edits. Adds `deltas` (parameter name in the pipeline -> tensor) while attached.

    Names are ``component.parameter`` (``unet.down_blocks.0...weight``). Detaching restores the
    original tensors bit for bit. ``save``/``load`` use safetensors with the base parameter shapes
    recorded, so an edit made for another model is refused; an edit whose ``meta["base_norms"]`` records the
    norms of the weights it was made from (:func:`weight_norms`) is also refused by a model of the same shapes
    whose weights differ. A subclass that computes its deltas passes its parameters after `deltas` and `meta`.
    """

    name = "weight-edit"

    def __init__(self, deltas: dict[str, torch.Tensor], meta: dict[str, str] | None = None, *args, **params):
        super().__init__(*args, **params)
        self.deltas, self.meta, self._orig = deltas, dict(meta or {}), {}

    @staticmethod
    def _param(pipe, name: str) -> torch.nn.Parameter:
        comp, _, pname = name.partition(".")
        module = getattr(pipe, comp, None)
        params = dict(module.named_parameters()) if isinstance(module, torch.nn.Module) else {}
        if pname not in params:
            raise StablekitError(
                f"weight edit names '{name}', which this pipeline does not have; it was made for another model"
            )
        return params[pname]

    def attach(self, pipe):
        base = json.loads(self.meta.get("base_norms", "{}"))
        now = weight_norms(pipe, base)
        if any(abs(now[n] - v) > 1e-3 * v for n, v in base.items()):
            raise StablekitError(f"this {self.name} edit was made for another model (the weights it edits differ)")
        params = {n: self._param(pipe, n) for n in self.deltas}
        for n, d in self.deltas.items():
            if params[n].shape != d.shape:
                raise StablekitError(
                    f"weight edit for '{n}' has shape {tuple(d.shape)} but the model's is "
                    f"{tuple(params[n].shape)}; it was made for another model"
                )
        for n, d in self.deltas.items():
            self._orig[n] = params[n].detach().clone()
            with torch.no_grad():
                params[n].add_(d.to(params[n].device, params[n].dtype))

    def detach(self, pipe):
        with torch.no_grad():
            for n, orig in self._orig.items():
                self._param(pipe, n).copy_(orig)
        self._orig = {}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.deltas.items()}, str(path), metadata=self.meta)

    @classmethod
    def load(cls, path: str | Path) -> WeightEdit:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise StablekitError(f"weight edit file '{path}' does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                return cls({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
        except (SafetensorError, OSError) as e:
            raise StablekitError(f"'{path}' is not a valid safetensors weight edit ({e})") from None


def weight_norms(pipe, names) -> dict[str, float]:
    """The Frobenius norm of each named pipeline parameter (``component.parameter``): a weight edit's base."""
    return {n: float(WeightEdit._param(pipe, n).detach().double().norm()) for n in names}


def extend_batch(value, n: int, rows: torch.Tensor):
    """Batch tensors (first dimension `n`, also inside dicts, tuples and lists) with ``value[rows]`` appended."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
        return torch.cat([value, value[rows.to(value.device)]])
    if isinstance(value, dict):
        return {k: extend_batch(v, n, rows) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(extend_batch(v, n, rows) for v in value)
    return value


def unet_kwargs(module, args, kwargs) -> dict:
    """All arguments of a UNet call by name."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
    bound.pop("self")
    return bound


class _BranchHook(ModelHook):
    def __init__(self, plugin: GuidanceBranches):
        super().__init__()
        self.plugin, self.batch = plugin, None

    def pre_forward(self, module, *args, **kwargs):
        p = self.plugin
        embeds = p.branch_embeds()
        if embeds is None:
            return args, kwargs
        if not p.call.do_cfg:
            raise StablekitError(f"{p!r} composes guidance: call the pipeline with guidance_scale > 1")
        kwargs = unet_kwargs(module, args, kwargs)
        n = kwargs["sample"].shape[0]
        self.batch = b = n // 2
        rows = torch.arange(b, n).repeat(len(embeds))  # the conditional rows, once per branch
        kwargs = {k: extend_batch(v, n, rows) for k, v in kwargs.items()}
        ehs = kwargs["encoder_hidden_states"]
        kwargs["encoder_hidden_states"] = torch.cat([ehs[:n], embeds.to(ehs).repeat_interleave(b, 0)])
        return (), kwargs

    def post_forward(self, module, output):
        b, self.batch = self.batch, None
        if b is None:
            return output
        x = output[0] if isinstance(output, tuple) else output.sample
        uncond, cond, extra = x[:b], x[b : 2 * b], x[2 * b :].unflatten(0, (-1, b))
        x = torch.cat([uncond, self.plugin.combine(uncond, cond, extra)])
        if isinstance(output, tuple):
            return (x,) + tuple(output[1:])
        output.sample = x
        return output


class GuidanceBranches(Plugin):
    """Seam helper (prompt embeddings + a UNet hook): extra prompts run as extra rows of the guided UNet batch,
    and :meth:`combine` turns the unconditional, conditional and extra noise predictions into a new conditional
    prediction, which the pipeline's own guidance then uses (``uncond + scale * (combined - uncond)``).

    Subclasses define ``prompts`` (texts, encoded with the pipeline's text encoder on attach) and implement
    :meth:`combine`; :meth:`branch_embeds` may return None to run a step without the branches."""

    prompts: list[str] = []

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self.embeds = None

    def attach(self, pipe):
        from .text import encode_ids, token_ids

        rows = [token_ids(pipe, t) for t in self.prompts]
        self.embeds = encode_ids(pipe, rows, getattr(pipe, "clip_skip", None))
        self.add_hook(pipe.unet, _BranchHook(self))

    def branch_embeds(self) -> torch.Tensor | None:
        return self.embeds

    def combine(self, uncond, cond, extra):
        """New conditional prediction ``(B, ...)`` from ``uncond``, ``cond`` ``(B, ...)`` and
        ``extra`` ``(k, B, ...)``."""
        raise NotImplementedError
