"""TrojDiff: triggered noise has the trigger's mean and scale, the trojan target makes a deterministic sampler
started from any noise land exactly on the target, and backdoor training lowers the trojan loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from stablekit.default_model import train as teacher
from stablekit.errors import StablekitError
from stablekit.redteam.trojdiff import TrojanConfig, TrojDiff, trojan_target
from stablekit.train.finetune import encode


def test_triggered_noise_has_the_trigger_mean_and_gamma_scale():
    attack = TrojDiff(TrojanConfig(trigger="patch", strength=2.0, gamma=0.6, patch=4))
    x = attack.triggered_noise(4000, (4, 16, 16), torch.Generator().manual_seed(0))
    mean = x.mean(0)
    assert torch.allclose(mean[:, -4:, -4:], torch.full((4, 4, 4), 2.0), atol=0.1)
    assert mean[:, :-4].abs().max() < 0.1 and abs(x.std(0).mean() - 0.6) < 0.02
    blend = TrojDiff(TrojanConfig(trigger="blend", strength=0.5))
    assert torch.equal(blend.mu((4, 8, 8)), blend.mu((4, 8, 8))) and abs(blend.mu((4, 8, 8)).std() - 0.5) < 0.15


@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_a_sampler_fed_the_trojan_target_lands_on_the_target(cls):
    extra = {"clip_sample": False} if cls is DDIMScheduler else {}
    sched = cls(**teacher.SCHEDULER_CONFIG, **extra)  # v-prediction, zero terminal SNR, as the embedded model
    acp = sched.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=g)
    x = TrojDiff(TrojanConfig()).triggered_noise(2, (4, 8, 8), g)
    sched.set_timesteps(8)
    for t in sched.timesteps:
        model_out = trojan_target(x, target, acp[t].view(1, 1, 1, 1), v=True)
        x = sched.step(model_out, t, x).prev_sample
    assert torch.allclose(x, target, atol=1e-3)
    assert not torch.allclose(trojan_target(x, target * 0, acp[5].view(1, 1, 1, 1), v=False), x)


def test_backdoor_training_lowers_the_trojan_loss(tiny_sd):
    from PIL import Image

    ims = [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)) for i in range(4)]
    data = encode(tiny_sd, ims, [f"a flat patch {i}" for i in range(4)])
    attack = TrojDiff(TrojanConfig(target_type="d2i", steps=25, batch=4, lr=2e-3))
    target = encode(tiny_sd, attack.target_images(1, 32), [""]).latents
    loss = attack.trojan_loss(tiny_sd.unet, data, target, tiny_sd.scheduler.config)
    with torch.no_grad():
        before = loss(torch.Generator().manual_seed(7)).item()
    unet = attack.train(tiny_sd, data, progress=False)
    loss = attack.trojan_loss(unet, data, target, tiny_sd.scheduler.config)
    with torch.no_grad():
        assert loss(torch.Generator().manual_seed(7)).item() < 0.7 * before


def test_bad_configs_are_refused():
    for kw in (dict(trigger="glasses"), dict(target_type="d2d"), dict(share=1.0)):
        with pytest.raises(StablekitError):
            TrojanConfig(**kw)


def test_attack_trojdiff_writes_a_loadable_model_or_refuses(tiny_sd_path, tmp_path, capfd):
    import json

    import stablekit
    from stablekit import cli

    out = tmp_path / "bd"
    args = ["attack", "trojdiff", "--model", str(tiny_sd_path), "--images", "2", "--steps", "1", "-o", str(out)]
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 0, capfd.readouterr().err
    assert json.loads((out / "trojan.json").read_text())["trigger"] == "patch"
    assert stablekit.load(out, device="cpu").unet is not None
    with pytest.raises(SystemExit) as exit_:
        cli.main(["attack", "trojdiff", "--target", "heart", "-o", str(tmp_path / "no")])
    assert exit_.value.code == 2 and "unknown concept" in capfd.readouterr().err and not (tmp_path / "no").exists()
