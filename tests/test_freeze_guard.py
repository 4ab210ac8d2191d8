"""FreezeAsGuard masks: the stated share frozen, the forbidden domain's most useful tensors (its loss falls
less under the mask than under a random mask of the same size), a file round trip, and the commands' refusals."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from stablekit import cli
from stablekit.errors import StablekitError
from stablekit.safety.freeze_guard import FreezeConfig, FreezeMask
from stablekit.train.finetune import FinetuneConfig, encode, finetune, step_loss


def _domain(kind: str, n=6):
    g = torch.Generator().manual_seed(0 if kind == "bad" else 1)
    ims = []
    for _ in range(n):
        x = torch.rand(3, 1, 1, generator=g).expand(3, 32, 32).clone()
        if kind == "bad":  # a bright square in the middle: structure, where the legal set is flat colour
            x[:, 8:24, 8:24] = 1.0
        ims.append(Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype("uint8")))
    word = "zorblat" if kind == "bad" else "plain"
    return ims, [f"a {word} picture number {i}" for i in range(n)]


def _loss_after(pipe, data, frozen):
    config = FinetuneConfig(mode="full", steps=15, batch=6, lr=3e-3, warmup=1, dropout=0.0)
    unet = finetune(pipe, data, config, frozen=frozen, progress=False)
    with torch.no_grad():
        return step_loss(unet, data, pipe.scheduler.config, 48, 0.0)(torch.Generator().manual_seed(9)).item()


def test_the_mask_freezes_the_share_that_serves_the_forbidden_domain(tiny_sd, tmp_path):
    config = FreezeConfig(ratio=0.3, steps=6, batch=6, lr=1e-3)
    mask = FreezeMask.learn(tiny_sd, _domain("bad"), _domain("good"), config)
    names = [n for n, _ in tiny_sd.unet.named_parameters()]
    assert len(mask.frozen) == round(0.3 * len(names)) and set(mask.frozen) <= set(names)
    mask.save(tmp_path / "m.json")
    assert FreezeMask.load(tmp_path / "m.json") == mask
    bad = encode(tiny_sd, *_domain("bad"))
    rand = tuple(random.Random(0).sample(names, len(mask.frozen)))
    assert _loss_after(tiny_sd, bad, mask.frozen) > _loss_after(tiny_sd, bad, rand)


def test_bad_masks_and_configs_are_refused(tmp_path):
    (tmp_path / "x.json").write_text('{"method": "uce"}')
    with pytest.raises(StablekitError, match="not a FreezeAsGuard mask"):
        FreezeMask.load(tmp_path / "x.json")
    with pytest.raises(StablekitError, match="ratio"):
        FreezeConfig(ratio=1.0)


def test_finetune_refuses_a_mask_of_another_model(tiny_sd_path, tmp_path, capfd):
    folder = tmp_path / "set"
    folder.mkdir()
    for i, (im, cap) in enumerate(zip(*_domain("good", 2), strict=True)):
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(cap)
    mask = FreezeMask(("down_blocks.9.weight",), FreezeConfig(), {"down_blocks.9.weight": 1.0})
    mask.save(tmp_path / "m.json")
    out = tmp_path / "out"
    args = ["finetune", str(folder), "-o", str(out), "--model", str(tiny_sd_path), "--freeze-guard"]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, str(tmp_path / "m.json")])
    err = capfd.readouterr().err
    assert exit_.value.code == 2 and "does not have" in err and not out.exists()
