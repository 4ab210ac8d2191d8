"""InfEdit (DDCM virtual inversion, unified attention control) on the tiny random-weight pipelines (32x32 images)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_sd, make_tiny_sdxl
from diffusers.hooks import ModelHook
from PIL import Image

import stablekit
from stablekit import CallState, Plugin, StablekitError, cli
from stablekit.edit import PromptToPrompt, UnifiedAttentionControl, decode, edit, infedit, invert
from stablekit.latents import Schedule, encode_image, encode_prompts, load_image

SOURCE = "a red star on a gray background"
TARGET = "a blue star on a gray background"
OTHER = "a blue circle on a white background"


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_sd()


def ddcm(pipe, image, prompts, guidance, steps=4, seed=0):
    z0 = encode_image(pipe, load_image(pipe, image))
    text = encode_prompts(pipe, prompts, z0)
    traj = infedit.sample(pipe, Schedule(pipe, steps), z0, text, guidance, torch.Generator().manual_seed(seed))
    return z0, traj


def pixels(im):
    return np.asarray(im).astype(int)


def test_ddcm_step_is_the_papers_noise_corrected_consistency_step():
    """The paper's form: e_cons = (z_src - sqrt(a) z0) / sqrt(1 - a), x0 = (z - sqrt(1 - a) (e - e_src + e_cons))
    / sqrt(a), every branch re-noised with the same noise; after the last step the x0 estimates."""
    sched = Schedule(make_tiny_sd(), 5)
    g = torch.Generator().manual_seed(0)
    z, e, z0, noise = (torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64) for n in (3, 3, 1, 1))
    for i in (0, 3, 4):
        a = sched.alphas[i]
        e_cons = (z[:1] - a.sqrt() * z0) / (1 - a).sqrt()
        x0 = (z - (1 - a).sqrt() * (e - e[:1] + e_cons)) / a.sqrt()
        b = sched.alphas[i + 1]
        expected = x0 if i == 4 else b.sqrt() * x0 + (1 - b).sqrt() * noise
        assert torch.allclose(infedit.step(sched, i, z, e, z0, noise), expected, atol=1e-12)
        assert torch.allclose(x0[0], z0[0], atol=1e-12)  # the source's x0 is the image latent


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_sdxl])
@pytest.mark.parametrize("guidance", [1.0, 2.3])
def test_equal_prompts_and_guidance_reproduce_the_source_latent(make, image, guidance):
    pipe = make()
    z0, traj = ddcm(pipe, image, [SOURCE, SOURCE], [guidance, guidance])
    assert traj.shape == (5, 2, 4, 16, 16)
    assert torch.equal(traj[-1, 0], z0[0])  # the source branch: exactly the image latent, no inversion
    assert torch.allclose(traj[-1, 1], z0[0], atol=1e-6) and torch.allclose(traj[:, 1], traj[:, 0], atol=1e-6)


def test_the_edit_and_the_guidance_change_the_target_only(pipe, image):
    z0, edited = ddcm(pipe, image, [SOURCE, OTHER], [1.0, 2.3])
    assert torch.equal(edited[-1, 0], z0[0]) and (edited[-1, 1] - z0[0]).abs().max() > 0.1
    _, guided = ddcm(pipe, image, [SOURCE, SOURCE], [1.0, 2.3])  # same prompt, more guidance: not the source
    assert (guided[-1, 1] - z0[0]).abs().max() > 1e-3
    _, reseeded = ddcm(pipe, image, [SOURCE, OTHER], [1.0, 2.3], seed=1)
    assert torch.equal(reseeded[-1, 0], z0[0]) and not torch.allclose(reseeded[-1, 1], edited[-1, 1], atol=1e-3)


def test_edit_reproduces_the_image_with_the_source_prompt_and_edits_with_another(pipe, image):
    ref = pixels(decode(pipe, encode_image(pipe, load_image(pipe, image))))
    assert np.abs(pixels(edit(pipe, image, SOURCE, SOURCE, "infedit", steps=4, guidance=1.0)) - ref).max() <= 1
    edited = edit(pipe, image, SOURCE, OTHER, "infedit", steps=4)
    assert isinstance(edited, Image.Image) and edited.size == (32, 32) and np.abs(pixels(edited) - ref).max() > 10
    assert np.array_equal(pixels(edit(pipe, image, SOURCE, OTHER, "infedit", steps=4)), pixels(edited))  # seeded


class Recorded(UnifiedAttentionControl):
    """Counts the self-attention layers run in each phase and the cross-attention maps replaced, per step;
    keeps the [source, layout, target] latents and the blend mask after every step."""

    def reset(self, call):
        super().reset(call)
        self.steps, self.self_layers, self.replaced = [], [], []

    def _stand_in(self, attn, cross):
        if not cross:
            self.self_layers.append(
                (self.call.step, "first" if self._until(self.config.self_replace_steps) else "mutual")
            )
        return super()._stand_in(attn, cross)

    def control(self, probs, heads, cross):
        out = super().control(probs, heads, cross)
        if out is not probs:
            self.replaced.append(self.call.step)
        return out

    def on_step_end(self, call, step, timestep, latents):
        latents = super().on_step_end(call, step, timestep, latents)
        self.steps.append((latents.clone(), None if self.mask is None else self.mask.clone()))
        return latents


def test_unified_attention_control_is_applied_and_counted(pipe, image):
    c = Recorded("replace", cross_replace_steps=0.5, self_replace_steps=0.75)
    edit(pipe, image, SOURCE, TARGET, "infedit", controller=c, steps=4)
    assert stablekit.attached(pipe) == [] and len(c.steps) == 4
    assert c.self_layers == [(i, "first" if i < 3 else "mutual") for i in range(4) for _ in range(4)]  # 4 layers
    assert c.replaced == [0] * 4 + [1] * 4  # the 4 cross-attention layers, for int(0.5 * 4) steps
    for i, (z, _) in enumerate(c.steps):  # the layout branch is the source until mutual self-attention starts
        assert torch.allclose(z[1], z[0], atol=1e-6) == (i < 3)
        assert (z[2] - z[0]).abs().max() > 1e-3


def test_unified_attention_control_keeps_equal_prompts_exact(pipe, image):
    c = Recorded(cross_replace_steps=1.0, self_replace_steps=0.5)
    edit(pipe, image, SOURCE, SOURCE, "infedit", controller=c, steps=4, guidance=1.0)
    assert all(torch.allclose(z, z[:1].expand_as(z), atol=1e-6) for z, _ in c.steps)


def self_attention(attn, query, keys, values):
    """softmax(q(query) k(keys)^T) v(values), through the module's own projections, for one (seq, dim) row each."""
    pairs = ((attn.to_q, query), (attn.to_k, keys), (attn.to_v, values))
    q, k, v = (attn.head_to_batch_dim(f(x[None])) for f, x in pairs)
    return attn.to_out[0](attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k), v)))[0]


@pytest.mark.parametrize("do_cfg", [True, False])
def test_self_attention_rows_source_maps_then_mutual(pipe, do_cfg):
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    h = torch.randn(6 if do_cfg else 3, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    c = UnifiedAttentionControl(self_replace_steps=0.5)
    with stablekit.use(pipe, c), torch.no_grad():

        def run(step):
            c.reset(CallState(do_cfg=do_cfg, prompt=[SOURCE, SOURCE, TARGET], num_steps=4, step=step))
            return attn(h).view(-1, 3, *h.shape[1:]), h.view(-1, 3, *h.shape[1:])

        out, x = run(1)  # first phase
        for half in range(len(out)):
            s, _, t = x[half]
            assert torch.allclose(out[half, 0], self_attention(attn, s, s, s), atol=1e-5)
            assert torch.allclose(out[half, 1], out[half, 0])  # the layout branch is the source
            assert torch.allclose(out[half, 2], self_attention(attn, s, s, t), atol=1e-5)  # source maps, own values
        out, x = run(2)  # mutual self-attention
        for half in range(len(out)):
            s, _, t = x[half]
            assert torch.allclose(out[half, 0], self_attention(attn, s, s, s), atol=1e-5)
            assert torch.allclose(out[half, 1], self_attention(attn, t, s, s), atol=1e-5)  # target queries
            assert torch.allclose(out[half, 2], self_attention(attn, t, t, t), atol=1e-5)


def test_local_blend_keeps_the_layout_branch_outside_the_mask(peaky, image):
    c = Recorded("replace", blend=["red", "blue"], threshold=0.8)
    edit(peaky, image, SOURCE, TARGET, "infedit", controller=c, steps=4)
    for z, mask in c.steps:
        assert mask.shape == (1, 1, 16, 16) and 0 < mask.mean() < 1
        assert torch.equal(torch.where(mask[0] == 0, z[2], z[1]), z[1])  # outside: exactly the layout branch
    z, mask = c.steps[-1]
    assert ((z[2] - z[1]) * mask[0]).abs().max() > 1e-3  # inside: the edit


class UnetBatches(Plugin):
    """Records the unet's batch size at every call and the steps seen by on_step_end."""

    def attach(self, pipe):
        probe = self

        class Hook(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                probe.batches.append(len(args[0]))
                return args, kwargs

        self.batches, self.steps = [], []
        self.add_hook(pipe.unet, Hook())

    def on_step_end(self, call, step, timestep, latents):
        self.steps.append((step, len(latents)))
        return latents


@pytest.mark.parametrize("guidance, batch", [(None, 4), (1.0, 2)])
def test_branches_and_guidance_halves(pipe, image, guidance, batch):
    probe = UnetBatches()
    edit(pipe, image, SOURCE, OTHER, "infedit", controller=probe, steps=3, guidance=guidance)
    assert probe.batches == [batch] * 3 and probe.steps == [(i, 2) for i in range(3)]  # [source, target], no layout
    p2p = PromptToPrompt("refine", blend=["star"])  # two branches: prompt-to-prompt runs as with the inversions
    assert edit(pipe, image, SOURCE, OTHER, "infedit", controller=p2p, steps=3).size == (32, 32)
    assert p2p.mask.shape == (1, 1, 16, 16)


def test_bad_input_is_one_line_stablekit_error(pipe, image):
    cases = [
        (dict(method="infedit", steps=0), "steps >= 1"),
        (dict(method="pti"), "unknown editing method 'pti'"),
        (dict(method="ddim", controller=UnifiedAttentionControl(), steps=2), "method='infedit'"),
        (dict(method="infedit", controller=UnifiedAttentionControl("replace")), "cannot be aligned"),
    ]
    for kw, match in cases:
        with pytest.raises(StablekitError, match=match) as e:
            edit(pipe, image, SOURCE, "a big red star on a gray background", **kw)
        assert "\n" not in str(e.value) and stablekit.attached(pipe) == []
    with pytest.raises(StablekitError, match="30x31; width and height must be multiples"):
        edit(pipe, image[:, :31, :30], SOURCE, TARGET, "infedit")
    with pytest.raises(StablekitError, match="InfEdit inverts nothing"):
        edit(pipe, invert(pipe, image, SOURCE, "ddim", 2), SOURCE, TARGET, "infedit")
    with stablekit.use(pipe, UnifiedAttentionControl()), pytest.raises(StablekitError, match="method='infedit'"):
        pipe([SOURCE, TARGET], num_inference_steps=1, height=32, width=32, output_type="latent")


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "in.png"
    low = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    data = (torch.nn.functional.interpolate(low[None], size=32, mode="bilinear")[0] * 255).round().byte()
    Image.fromarray(data.permute(1, 2, 0).numpy()).save(path)
    return path


def invoke(png, model, out, *args):
    return CliRunner().invoke(
        cli.cli,
        ["edit", str(png), "--model", str(model), "--source", SOURCE, "-o", str(out), "--method", "infedit", *args],
    )


@pytest.mark.parametrize(
    "args, controller, steps",
    [([], "", "12"), (["--steps", "3", "--controller", "replace", "--blend", "red"], "replace", "3")],
)
def test_cli_edit_with_infedit(png, tmp_path, tiny_sd_path, args, controller, steps):
    out = tmp_path / "edit.png"
    result = invoke(png, tiny_sd_path, out, "--target", TARGET, *args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out)]
    meta = Image.open(out).text
    assert [meta[k] for k in ("method", "controller", "steps", "guidance")] == ["infedit", controller, steps, "2.3"]


@pytest.mark.parametrize(
    "args, match",
    [(["--controller", "replace"], "cannot be aligned for a replace edit"), (["--steps", "0"], "--steps 0")],
)
def test_cli_bad_input_one_error_line(png, tmp_path, tiny_sd_path, args, match):
    result = invoke(png, tiny_sd_path, tmp_path / "out.png", "--target", "a big red star on a gray background", *args)
    assert result.exit_code == 2 and result.stdout == "" and not (tmp_path / "out.png").exists()
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ") and match in result.stderr
