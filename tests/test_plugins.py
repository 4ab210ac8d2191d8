"""Each plugin seam on the tiny pipelines: its effect, per-call state, conflicts, and exact removal; plugin
parameters as frozen, validating configs with complete reprs that round-trip through the registry."""

import dataclasses
import inspect

import pytest
import torch
from conftest import make_tiny_sdxl, run
from diffusers import EulerDiscreteScheduler
from diffusers.hooks import ModelHook

import stablekit
from stablekit import CallState, Plugin, SchedulerPlugin, StablekitError, WeightEdit, safety
from stablekit.edit.infedit import UnifiedAttentionControl
from stablekit.edit.prompt_to_prompt import PromptToPrompt
from stablekit.redteam.arithmetic import ConceptArithmetic
from stablekit.registry import CATALOGUE, build, format_value


class CountingZeroHook(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def post_forward(self, module, output):
        self.calls += 1
        return output * 0


class HookPlugin(Plugin):
    name = "zero-mid"

    def attach(self, pipe):
        self.hook = CountingZeroHook()
        self.add_hook(pipe.unet.mid_block, self.hook)


class FixedLatents(Plugin):
    def __init__(self, latents):
        super().__init__()
        self.latents = latents

    def make_latents(self, call, shape, generator, dtype, device):
        assert tuple(shape) == tuple(self.latents.shape)
        return self.latents.clone()


class Recorder(Plugin):
    """Step callback seam: records what it sees, zeroes the latents after the last step."""

    def reset(self, call):
        super().reset(call)
        self.steps, self.timesteps, self.resets = [], [], getattr(self, "resets", 0) + 1

    def on_step_end(self, call, step, timestep, latents):
        self.steps.append(step)
        self.timesteps.append(int(timestep))
        return latents * 0 if step == call.num_steps - 1 else latents


class SwapEmbeds(Plugin):
    """Prompt-embedding seam: replaces the conditional embeddings with given ones."""

    def __init__(self, embeds):
        super().__init__()
        self.embeds = embeds

    def transform_embeds(self, call, pe, npe):
        self.seen_cfg = call.do_cfg
        return self.embeds.to(pe.dtype), npe


def test_module_hook_effect_count_and_removal(tiny_sd):
    ref = run(tiny_sd, steps=3)
    plugin = HookPlugin()
    with stablekit.use(tiny_sd, plugin):
        out = run(tiny_sd, steps=3)
        assert plugin.hook.calls == 3  # one UNet call per step, CFG batched
        assert not torch.equal(out, ref)
    assert torch.equal(run(tiny_sd, steps=3), ref)
    assert not hasattr(tiny_sd.unet.mid_block, "_diffusers_hook") or not tiny_sd.unet.mid_block._diffusers_hook.hooks


def test_scheduler_seam(tiny_sd):
    ref, old = run(tiny_sd), tiny_sd.scheduler
    with stablekit.use(tiny_sd, SchedulerPlugin(EulerDiscreteScheduler)):
        assert isinstance(tiny_sd.scheduler, EulerDiscreteScheduler)
        assert tiny_sd.scheduler.config.beta_schedule == old.config.beta_schedule
        assert not torch.equal(run(tiny_sd), ref)
    assert tiny_sd.scheduler is old
    assert torch.equal(run(tiny_sd), ref)


def test_prompt_embedding_seam(tiny_sd):
    ref = run(tiny_sd, prompt="a blue circle")
    other, _ = tiny_sd.encode_prompt("a blue circle", "cpu", 1, False)
    plugin = SwapEmbeds(other)
    with stablekit.use(tiny_sd, plugin):
        assert torch.equal(run(tiny_sd, prompt="a red star"), ref)
        assert plugin.seen_cfg is True
    assert not torch.equal(run(tiny_sd, prompt="a red star"), ref)


def test_initial_latent_seam(tiny_sd):
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = run(tiny_sd, latents=lat)
    with stablekit.use(tiny_sd, FixedLatents(lat)):
        assert torch.equal(run(tiny_sd, seed=123), ref)
    assert not torch.equal(run(tiny_sd, seed=123), ref)


def test_step_callback_counts_steps_and_resets_each_call(tiny_sd):
    plugin = Recorder()
    with stablekit.use(tiny_sd, plugin):
        out = run(tiny_sd, steps=4)
        assert plugin.steps == [0, 1, 2, 3]
        assert plugin.timesteps == [int(t) for t in tiny_sd.scheduler.timesteps]
        assert torch.count_nonzero(out) == 0
        run(tiny_sd, steps=2)
        assert plugin.steps == [0, 1] and plugin.resets == 2
        assert plugin.call.do_cfg and plugin.call.num_steps == 2
        run(tiny_sd, steps=2, guidance_scale=1.0)
        assert not plugin.call.do_cfg


def test_weight_edit_apply_remove_save_load(tiny_sd, tmp_path):
    ref = run(tiny_sd)
    name = "unet.conv_in.weight"
    before = tiny_sd.unet.conv_in.weight.detach().clone()
    edit = WeightEdit({name: torch.randn_like(before) * 0.5}, meta={"base": "tiny"})
    with stablekit.use(tiny_sd, edit):
        assert torch.allclose(tiny_sd.unet.conv_in.weight, before + edit.deltas[name])
        edited = run(tiny_sd)
        assert not torch.equal(edited, ref)
    assert torch.equal(tiny_sd.unet.conv_in.weight, before)
    assert torch.equal(run(tiny_sd), ref)
    edit.save(tmp_path / "edit.safetensors")
    loaded = WeightEdit.load(tmp_path / "edit.safetensors")
    assert loaded.meta == {"base": "tiny"}
    with stablekit.use(tiny_sd, loaded):
        assert torch.equal(run(tiny_sd), edited)


def test_weight_edit_for_another_model_is_refused(tiny_sd, tmp_path):
    with pytest.raises(StablekitError, match="another model"):
        stablekit.use(tiny_sd, WeightEdit({"unet.conv_in.weight": torch.zeros(3, 3)}))
    with pytest.raises(StablekitError, match="another model"):
        stablekit.use(tiny_sd, WeightEdit({"unet.no_such.weight": torch.zeros(3)}))
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(StablekitError, match="not a valid"):
        WeightEdit.load(tmp_path / "bad.safetensors")
    assert stablekit.attached(tiny_sd) == []


def test_conflicts_are_reported_before_anything_changes(tiny_sd):
    lat = torch.zeros(1, 4, 16, 16)
    old = tiny_sd.scheduler
    with pytest.raises(StablekitError, match="initial latents"):
        stablekit.use(tiny_sd, FixedLatents(lat), FixedLatents(lat))
    with pytest.raises(StablekitError, match="scheduler"):
        stablekit.use(tiny_sd, SchedulerPlugin(EulerDiscreteScheduler), SchedulerPlugin(EulerDiscreteScheduler))
    assert tiny_sd.scheduler is old and stablekit.attached(tiny_sd) == []
    with stablekit.use(tiny_sd, FixedLatents(lat)):  # across separate use() calls too
        with pytest.raises(StablekitError, match="conflicts"):
            stablekit.use(tiny_sd, FixedLatents(lat))


def test_all_seams_stacked_then_removed_bit_identical(tiny_sd):
    ref = run(tiny_sd, steps=3)
    lat = torch.randn(1, 4, 16, 16)
    other, _ = tiny_sd.encode_prompt("a blue circle", "cpu", 1, False)
    plugins = [
        HookPlugin(),
        SchedulerPlugin(EulerDiscreteScheduler),
        SwapEmbeds(other),
        FixedLatents(lat),
        Recorder(),
        WeightEdit({"unet.conv_out.bias": torch.ones(4)}),
    ]
    outer = stablekit.use(tiny_sd, *plugins[:3])
    with stablekit.use(tiny_sd, *plugins[3:]):  # nested attach stacks
        run(tiny_sd, steps=3)
        assert plugins[0].hook.calls == 3 and plugins[4].steps == [0, 1, 2]
        assert len(stablekit.attached(tiny_sd)) == 6
    outer.remove()
    assert stablekit.attached(tiny_sd) == [] and "encode_prompt" not in tiny_sd.__dict__
    assert torch.equal(run(tiny_sd, steps=3), ref)


def test_sdxl_prompt_seam_and_step_count():
    pipe = make_tiny_sdxl()
    blue = pipe.encode_prompt(
        "a blue circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0]
    pooled_red = pipe.encode_prompt(
        "a red star", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )[2]
    ref = run(pipe, prompt=None, prompt_embeds=blue, pooled_prompt_embeds=pooled_red)
    rec = Recorder()
    with stablekit.use(pipe, SwapEmbeds(blue)):  # SDXL's 4-tuple: only the token embeddings change
        assert torch.equal(run(pipe, prompt="a red star"), ref)
    with stablekit.use(pipe, rec):
        out = run(pipe, prompt="a red star")
    assert rec.steps == [0, 1, 2] and torch.count_nonzero(out) == 0


def test_call_state_halves():
    x = torch.arange(4.0).reshape(4, 1)
    u, c = CallState(do_cfg=True).halves(x)
    assert u.tolist() == [[0.0], [1.0]] and c.tolist() == [[2.0], [3.0]]
    assert CallState(do_cfg=False).halves(x)[0] is None


def test_stochastic_schedulers_keep_their_generator_under_plugins(tiny_sd):
    """The step wrapper keeps scheduler.step's signature, so the pipeline still passes `generator`."""
    from diffusers import EulerAncestralDiscreteScheduler

    tiny_sd.scheduler = EulerAncestralDiscreteScheduler.from_config(tiny_sd.scheduler.config)
    ref = run(tiny_sd)
    with stablekit.use(tiny_sd, Recorder()):
        torch.manual_seed(123)  # a wrapper that dropped `generator` would draw from this global state
        a = run(tiny_sd)
        torch.manual_seed(456)
        b = run(tiny_sd)
    assert torch.equal(a, b) and torch.count_nonzero(a) == 0  # Recorder zeroes the last step
    with stablekit.use(tiny_sd, HookPlugin()):
        torch.manual_seed(7)
        c = run(tiny_sd)
    torch.manual_seed(8)
    assert not torch.equal(c, ref) and torch.equal(run(tiny_sd), ref)


# ---------------------------------------------------------------- parameters as configs

REGISTRIES = {"accel": CATALOGUE["accel"], "guard": CATALOGUE["guard"]}
REGISTERED = [(what, name, cls) for what, registry in REGISTRIES.items() for name, cls in registry.items()]
# every field away from its default, so a repr or spec that dropped or garbled one would not round-trip
VARIED = {
    "deepcache": "interval=2,branch=1,schedule=[0,3],center=0.5,power=1.2",
    "multidiffusion": "tile=8,batch=2,tiled_vae=false,stride=4",
    "shifted-tiles": "tile=8,batch=2,tiled_vae=false,seed=5",
    "encoder-propagation": "interval=4,key_steps=[0,2,5],reference_steps=10,parallel=true,prior_noise=0.003,"
    "prior_noise_below=400",
    "feature-inheritance": "blocks=[mid_block,up_blocks.1],interval=3,schedule=quadratic,center=0.4,power=1.6",
    "lcm-lora": "lora=other.safetensors,weight=0.5",
    "safree": "concepts=[star,red],alpha=0.1,detect=false,project=false,self_validation=false,upper=0.5,gain=10,"
    "center=0.2,re_attention=false,scales=[1.0,0.5],radius=2,negative_prompt=true,space=tokens,rank=2",
    "sld": "concepts=[star],guidance=500,warmup=2,threshold=0.1,momentum=0.5,beta=0.5",
    "uce": "concepts=[star,red],guides=[circle,blue],preserve=[square],erase_scale=2,preserve_scale=0.5,lamb=0.25",
}
BAD = {  # one bad value each, with what its one-line error names
    "deepcache": ({"interval": 0}, "interval"),
    "multidiffusion": ({"stride": 0}, "stride"),
    "shifted-tiles": ({"batch": 0}, "batch"),
    "encoder-propagation": ({"prior_noise": -1.0}, "prior_noise"),
    "feature-inheritance": ({"schedule": "cubic"}, "schedule"),
    "lcm-lora": ({"lora": " "}, "lora"),
    "safree": ({"concepts": ["star"], "rank": 0}, "rank"),
    "sld": ({"concepts": ["star"], "beta": 2.0}, "beta"),
    "uce": ({"concepts": ["star", "red"], "guides": ["a", "b", "c"]}, "guide"),
}
UNREGISTERED = [
    PromptToPrompt("refine", cross_replace_steps=0.5, weights={"star": 2.0}, blend=["star"], threshold=0.2),
    UnifiedAttentionControl(self_replace_steps=0.3),
    ConceptArithmetic([(["a red star", "a blue star"], 1.0), (["star", "circle"], -0.5)]),
    safety.SPM(["star"], {}, rank=2, alpha=4.0, multiplier=0.5),
]


def repr_params(plugin) -> dict:
    """The keyword arguments a plugin's repr shows, evaluated."""
    text = repr(plugin)
    assert text.startswith(type(plugin).__name__ + "(") and text.endswith(")"), text
    return eval(f"dict({text[len(type(plugin).__name__) + 1 : -1]})")


def test_every_registered_plugin_is_tested():
    assert set(VARIED) == set(BAD) == {name for _, name, _ in REGISTERED}


@pytest.mark.parametrize("what, name, cls", REGISTERED, ids=[r[1] for r in REGISTERED])
def test_config_is_frozen_and_its_repr_round_trips_through_the_registry(what, name, cls):
    plugin = build(f"{name}:{VARIED[name]}", REGISTRIES[what], what)
    config = plugin.config
    assert isinstance(config, cls.Config) and dataclasses.is_dataclass(config)
    fields = [f.name for f in dataclasses.fields(config)]
    assert list(inspect.signature(cls).parameters) == fields  # declared once: the class shows its config's
    required = {"concepts": ("star",), "lora": "x.safetensors"}  # the fields a plugin cannot do without
    defaults = cls.Config(**{k: v for k, v in required.items() if k in fields})
    assert all(getattr(config, f) != getattr(defaults, f) for f in fields if f != "concepts")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, fields[0], getattr(config, fields[0]))
    params = repr_params(plugin)
    assert list(params) == fields  # the repr is complete
    spec = f"{name}:" + ",".join(f"{k}={format_value(v)}" for k, v in params.items())
    assert build(spec, REGISTRIES[what], what).config == config
    assert cls(config).config is config and cls(**params).config == config


@pytest.mark.parametrize("what, name, cls", REGISTERED, ids=[r[1] for r in REGISTERED])
def test_bad_values_are_one_line_errors_from_the_config(what, name, cls):
    params, fragment = BAD[name]
    spec = f"{name}:" + ",".join(f"{k}={format_value(v)}" for k, v in params.items())
    with pytest.raises(StablekitError) as direct:
        cls(**params)
    with pytest.raises(StablekitError) as built:
        build(spec, REGISTRIES[what], what)
    for e in (direct, built):
        assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)
    assert str(built.value) == f"{what} '{spec}': {direct.value}"


@pytest.mark.parametrize("plugin", UNREGISTERED, ids=lambda p: type(p).__name__)
def test_unregistered_plugins_have_frozen_configs_and_complete_reprs(plugin):
    cls, config = type(plugin), plugin.config
    fields = [f.name for f in dataclasses.fields(config)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, fields[0], getattr(config, fields[0]))
    params = repr_params(plugin)
    assert list(params) == fields
    if cls is safety.SPM:  # its weights are data, not parameters
        assert cls(config, {}).config is config and cls(weights={}, **params).config == config
    else:
        assert cls(config).config is config and cls(**params).config == config


def test_scheduler_plugin_config_and_repr():
    plugin = SchedulerPlugin(EulerDiscreteScheduler, timestep_spacing="trailing")
    assert plugin.config.overrides == {"timestep_spacing": "trailing"}
    assert repr(plugin) == "SchedulerPlugin(EulerDiscreteScheduler, timestep_spacing='trailing')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plugin.config.scheduler = None
    with pytest.raises(StablekitError, match="scheduler class"):
        SchedulerPlugin("euler")


def test_per_call_state_stays_on_the_plugin(tiny_sd):
    """The config is the same object after calls; what a call changes lives on the plugin and is reset."""
    plugin = safety.SLD(["star"], warmup=0)
    config = plugin.config
    with stablekit.use(tiny_sd, plugin):
        run(tiny_sd, prompt="a red star", guidance_scale=3.0)
        assert plugin._v is not None
        plugin.reset(CallState())
        assert plugin._v is None
    assert plugin.config is config == safety.SLD.Config(("star",), warmup=0)
