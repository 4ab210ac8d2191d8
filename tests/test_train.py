"""Training recipes: the immiscible assignment, ScaleLong's skip scaling, the condition corruption's share, the
shared loop's exact resume, and `stablekit train` end to end (a loadable folder, refusals that write nothing)."""

from __future__ import annotations

import json

import pytest
import torch

from stablekit import cli
from stablekit.train import TrainConfig, WorldData, build_unet, fit, recipe, train
from stablekit.train.corruption import perturb
from stablekit.train.features import encoder_features
from stablekit.train.immiscible import assign
from stablekit.train.rrcm import info_nce
from stablekit.train.scalelong import install, skip_count
from stablekit.train.spd import ShortestPathScheduler, coefficients, fourier, spatial
from stablekit.train.umd import patch_keep


def test_immiscible_assignment_is_a_permutation_that_shortens_the_pairs():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x0 = torch.randn(16, 4, 8, 8, generator=g) * 0.5 + 0.3
        noise = torch.randn(16, 4, 8, 8, generator=g)
        cols = assign(x0, noise)
        assert sorted(cols.tolist()) == list(range(16))
        paired = (x0 - noise[cols]).flatten(1).norm(dim=1).sum()
        for _ in range(20):  # no random pairing is shorter than the optimal one
            perm = torch.randperm(16, generator=g)
            assert paired <= (x0 - noise[perm]).flatten(1).norm(dim=1).sum() + 1e-6
        assert paired < (x0 - noise).flatten(1).norm(dim=1).sum()


def _skips_seen(unet, x, t, c):
    """(the long skips as the down path makes them, outermost first; the skips the up blocks receive, in order)."""
    made, given = [], []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: made.append(out))]
    hooks += [b.register_forward_hook(lambda m, a, out: made.extend(out[1])) for b in unet.down_blocks]
    hooks += [
        b.register_forward_pre_hook(lambda m, a, k: given.extend(k["res_hidden_states_tuple"]), with_kwargs=True)
        for b in unet.up_blocks
    ]
    with torch.no_grad():
        out = unet(x, t, c).sample
    for h in hooks:
        h.remove()
    return out, made, given


def test_scalelong_kappa_one_is_plain_and_kappa_scales_the_ith_skip_by_kappa_to_the_i():
    torch.manual_seed(0)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 5, 384)
    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    with torch.no_grad():
        plain = unet(x, t, c).sample
    recipe("scalelong:kappa=1").prepare(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t, c).sample, plain)
    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    recipe("scalelong:kappa=0.5").prepare(unet)
    out, made, given = _skips_seen(unet, x, t, c)
    assert not torch.allclose(out, plain)
    assert len(made) == len(given) == skip_count(unet) == 6
    found = []  # the down path's index i of each skip the up path receives, which must arrive times 0.5**i
    for g in given:
        found += [i for i, m in enumerate(made) if m.shape == g.shape and torch.allclose(m * 0.5**i, g)]
    assert sorted(found) == list(range(6))


def test_corruption_perturbs_the_stated_share_at_the_stated_scale():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(4000, 8, 16) * 3
    out, rows = perturb(cond, share=0.25, gamma=0.1, gen=g)
    changed = (out != cond).flatten(1).any(1)
    assert torch.equal(changed, rows)
    assert 0.22 < rows.float().mean() < 0.28
    rel = (out - cond)[rows].std() / cond[rows].pow(2).mean().sqrt()
    assert 0.095 < rel < 0.105
    full, rows = perturb(cond, share=1.0, gamma=0.1, gen=g)
    assert rows.all() and (full != cond).flatten(1).any(1).all()


def _toy_data(n=24):
    g = torch.Generator().manual_seed(0)
    return WorldData(
        latents=torch.randn(n, 4, 16, 16, generator=g),
        cap_idx=torch.arange(n) % 6,
        text=torch.randn(6, 5, 384, generator=g).half(),
        uncond=torch.zeros(5, 384),
        scaling_factor=1.0,
    )


class _Stop(Exception):
    pass


@pytest.mark.parametrize("spec", ["immiscible", "scalelong:scheme=learned"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, spec, monkeypatch):
    import stablekit.train.base as R

    config = TrainConfig(steps=4, batch=4, size="tiny", warmup=2, save_every=1)
    _, ema, extra, whole = train(recipe(spec), _toy_data(), config, tmp_path / "a.pt", progress=False)
    real = R.batch_loss

    def dies_at_step_3(rec, unet, data, batch):  # the data loader fails on the third step
        inner, calls = real(rec, unet, data, batch), []

        def step_loss(gen):
            calls.append(1)
            if len(calls) == 3:
                raise _Stop
            return inner(gen)

        return step_loss

    monkeypatch.setattr(R, "batch_loss", dies_at_step_3)
    with pytest.raises(_Stop):
        train(recipe(spec), _toy_data(), config, tmp_path / "b.pt", progress=False)
    monkeypatch.setattr(R, "batch_loss", real)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 2
    _, ema2, extra2, resumed = train(recipe(spec), _toy_data(), config, tmp_path / "b.pt", progress=False)
    assert resumed["step"] == 4 and resumed["losses"] == whole["losses"]
    for k, v in whole["unet"].items():
        assert torch.equal(v, resumed["unet"][k]), k
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ema2.state_dict()[k]), k
    if spec.startswith("scalelong"):
        assert torch.equal(extra.scales, extra2.scales) and not torch.equal(extra.scales, 0.5 ** torch.arange(6.0))


def test_fit_with_a_time_budget_stops():
    unet = build_unet("tiny")
    config = TrainConfig(steps=None, minutes=0.002, size="tiny")
    state = fit(unet, lambda g: unet.conv_in.weight.pow(2).sum(), config, progress=False)
    assert state["step"] >= 1


def _cli(args, capfd):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *args])
    out, err = capfd.readouterr()
    return exit_.value.code, out, err


def test_train_command_writes_a_loadable_folder_and_refuses_bad_input(tmp_path, capfd):
    import stablekit

    out = tmp_path / "run"
    small = ["--size", "tiny", "--batch", "4", "--captions", "6", "--variants", "1", "--warmup", "2"]
    code, _, err = _cli(["--recipe", "scalelong:kappa=0.7", "--steps", "3", "-o", str(out), *small], capfd)
    assert code == 0, err
    run = json.loads((out / "train.json").read_text())
    assert run["recipe"] == "scalelong" and run["params"]["kappa"] == 0.7 and run["steps_done"] == 3
    assert run["config"]["seed"] == 0 and run["config"]["data_seed"] == 0 and "ScaleLong" in run["paper"]
    pipe = stablekit.load(out, device="cpu")
    assert list(pipe.unet.config.block_out_channels) == [16, 16, 32]
    bare = type(pipe.unet).from_pretrained(out / "unet").eval()  # load() put the recorded skip scales back
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 5, 384)
    with torch.no_grad():
        loaded = pipe.unet(x, t, c).sample
        assert not torch.allclose(loaded, bare(x, t, c).sample)
        assert len(install(bare, out)) == len(pipe.unet.up_blocks)
        assert torch.equal(loaded, bare(x, t, c).sample)
    before = sorted(p.name for p in out.iterdir())
    capfd.readouterr()  # the loading's progress bars
    for args in (
        ["--recipe", "nope", "--steps", "3", "-o", str(out)],
        ["--recipe", "plain:kappa=1", "--steps", "3", "-o", str(out)],
        ["--recipe", "plain", "--steps", "0", "-o", str(tmp_path / "new")],
        ["--recipe", "plain", "--minutes", "0", "-o", str(tmp_path / "new")],
        ["--recipe", "plain", "-o", str(tmp_path / "new")],  # no budget
        ["--recipe", "plain", "--steps", "3", "-o", str(out)],  # the folder holds a scalelong run
        ["--recipe", "plain", "--steps", "3", "-o", str(tmp_path)],  # the folder holds other files
    ):
        code, stdout, err = _cli([*args, *small], capfd)
        assert code == 2 and stdout == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == before and not (tmp_path / "new").exists()


def test_spd_folder_loads_with_its_sampler(tmp_path, capfd):
    import stablekit

    out = tmp_path / "spd"
    small = ["--size", "tiny", "--batch", "4", "--captions", "6", "--variants", "1", "--warmup", "2"]
    code, _, err = _cli(["--recipe", "spd:m=1.5", "--steps", "2", "-o", str(out), *small], capfd)
    assert code == 0, err
    pipe = stablekit.load(out, device="cpu")
    assert isinstance(pipe.scheduler, ShortestPathScheduler) and pipe.scheduler.config.m == 1.5
    image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_encoder_features_are_the_full_forward_s_middle_block():
    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    x, t, c = torch.randn(3, 4, 16, 16), torch.tensor([0, 300, 999]), torch.randn(3, 5, 384)
    seen = {}
    unet.mid_block.register_forward_hook(lambda m, a, out: seen.setdefault("mid", out))
    with torch.no_grad():
        unet(x, t, c)
        assert torch.allclose(encoder_features(unet, x, t, c), seen["mid"].mean(dim=(2, 3)), atol=1e-6)


def _spd_point(x0, eps, t):
    a, s = coefficients(torch.full((len(x0),), t), x0.shape[-1], 1.59, 0.0086, 2.0)
    return spatial(a * fourier(x0) + s * fourier(eps)), spatial(a * fourier(eps) - s * fourier(x0))


def test_spd_sampler_inverts_the_corruption_given_the_true_velocity():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 16, 16, generator=g) * 0.7 + 0.4, torch.randn(2, 4, 16, 16, generator=g)
    sched = ShortestPathScheduler()
    sched.set_timesteps(7)
    x, _ = _spd_point(x0, eps, int(sched.timesteps[0]))
    assert torch.allclose(x, eps, atol=1e-5)  # the last timestep is pure noise
    for t in sched.timesteps:
        x = sched.step(_spd_point(x0, eps, int(t))[1], t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-4)


def test_spd_takes_the_signal_to_noise_ratio_of_high_frequencies_first():
    from stablekit.train.spd import spectrum

    power = spectrum(16, 1.59, 0.0086, 2.0)
    a, s = coefficients(torch.tensor([-1, 400, 999]), 16, 1.59, 0.0086, 2.0)
    assert torch.equal(a[0], torch.ones_like(a[0])) and torch.equal(a[2], torch.zeros_like(a[2]))
    snr = (a[1, 0] ** 2 * power / s[1, 0] ** 2).flatten()
    order = power.flatten().argsort()  # from the highest frequency (least power) to the lowest
    assert (snr[order].diff() >= -1e-9).all() and snr.max() > 100 * snr.min()


def test_umd_hides_the_stated_share_of_whole_patches_and_trains_the_clean_step_on_them():
    g = torch.Generator().manual_seed(0)
    keep = patch_keep((500, 4, 16, 16), 2, torch.full((500,), 0.375), g)
    patches = keep[:, 0, ::2, ::2]
    assert torch.equal(keep, patches.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None])
    assert ((1 - patches).flatten(1).sum(1) == 24).all()  # round(0.375 * 64) patches hidden per image
    rec = recipe("umd:no_noise_prob=0.99")
    seen = {}

    def unet(x, t, cond):  # the loss's network: records its input and answers the clean latent
        seen.update(x=x, t=t)
        return type("Out", (), {"sample": x0})()

    from diffusers import DDPMScheduler

    from stablekit.default_model.train import SCHEDULER_CONFIG

    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    x0 = torch.randn(8, 4, 16, 16, generator=g)
    loss = rec.loss(unet, x0, torch.randn_like(x0), torch.full((8,), 700), None, sched, snr, g)
    clean = seen["t"] == 0
    assert clean.sum() >= 6 and loss < 0.5  # clean rows cost nothing when the hidden patches are right
    hidden = (seen["x"][clean] == 0).float().mean()
    assert 0.7 < hidden < 0.8 and torch.equal(seen["x"][clean] != 0, x0[clean] * (seen["x"][clean] != 0) != 0)


def test_info_nce_rewards_the_matching_row_and_rrcm_trains_its_heads():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 32, generator=g)
    assert info_nce(z, z + 0.01 * torch.randn(16, 32, generator=g), 0.2) < 0.5
    assert info_nce(z, z[torch.randperm(16, generator=g)], 0.2) > 2.0
    config = TrainConfig(steps=2, batch=8, size="tiny", warmup=1)
    _, _, heads, state = train(recipe("rrcm:gap=100"), _toy_data(), config, progress=False)
    assert set(dict(heads.named_children())) == {"projector", "predictor"} and len(state["losses"]) == 2
