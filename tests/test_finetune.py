"""`stablekit finetune`: LoRA files that reproduce the trained UNet exactly and detach bit for bit, frozen
tensors that never move, a fine-tune that fits its set, folders that load, resumes, and bad input refused with
one line and nothing written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.errors import StablekitError
from stablekit.train.finetune import FinetuneConfig, encode, finetune, read_folder, step_loss
from stablekit.train.lora_adapter import LoRAAdapter


def _images(n=6, size=32):
    g = torch.Generator().manual_seed(0)
    cols = torch.randint(0, 255, (n, 3), generator=g).tolist()
    ims = [Image.new("RGB", (size, size), tuple(c)) for c in cols]
    return ims, [f"a flat patch number {i}" for i in range(n)]


def _folder(path, n=6, size=32):
    path.mkdir()
    ims, caps = _images(n, size)
    for i, (im, cap) in enumerate(zip(ims, caps, strict=True)):
        im.save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(cap)
    return path


def _unet_out(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 800]), c).sample


def test_a_lora_file_reproduces_the_trained_unet_and_detaches_exactly(tiny_sd, tmp_path):
    data = encode(tiny_sd, *_images())
    ema = finetune(tiny_sd, data, FinetuneConfig(steps=3, batch=2, lr=1e-2, warmup=1), progress=False)
    adapter = LoRAAdapter.from_peft(ema, {"model": "tiny"})
    adapter.save(tmp_path / "a.safetensors")
    loaded = LoRAAdapter.load(tmp_path / "a.safetensors")
    base = copy.deepcopy(tiny_sd.unet.state_dict())
    before = _unet_out(tiny_sd.unet)
    with stablekit.use(tiny_sd, loaded):
        with_lora = _unet_out(tiny_sd.unet)
    assert torch.allclose(with_lora, _unet_out(ema), atol=1e-5)
    assert not torch.allclose(with_lora, before, atol=1e-4)  # the LoRA changed the model
    for k, v in tiny_sd.unet.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_frozen_tensors_never_move_and_the_rest_fit_the_set(tiny_sd):
    data = encode(tiny_sd, *_images())
    names = [n for n, _ in tiny_sd.unet.named_parameters()]
    frozen = frozenset(n for n in names if "attn2" in n or n.startswith("conv_in"))
    config = FinetuneConfig(mode="full", steps=30, batch=6, lr=2e-3, warmup=1, dropout=0.0)
    ema = finetune(tiny_sd, data, config, frozen=frozen, progress=False)
    base, tuned = dict(tiny_sd.unet.named_parameters()), dict(ema.named_parameters())
    for n in names:
        assert torch.equal(base[n], tuned[n]) == (n in frozen), n
    losses = []
    for unet in (tiny_sd.unet, ema):
        loss = step_loss(unet, data, tiny_sd.scheduler.config, 64, 0.0)
        with torch.no_grad():
            losses.append(loss(torch.Generator().manual_seed(5)).item())
    assert losses[1] < 0.8 * losses[0]


def test_lora_on_frozen_weights_stays_zero(tiny_sd):
    data = encode(tiny_sd, *_images())
    frozen = frozenset(n for n, _ in tiny_sd.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    ema = finetune(tiny_sd, data, FinetuneConfig(steps=3, batch=2, lr=1e-2, warmup=1), frozen=frozen, progress=False)
    deltas = LoRAAdapter.from_peft(ema).deltas
    for n in frozen:
        assert not deltas[f"unet.{n}"].any(), n
    assert sum(bool(d.any()) for d in deltas.values()) > len(frozen)


def test_a_lora_of_another_model_is_refused(tiny_sd, tiny_sdxl_path):
    tiny_sdxl = stablekit.load(tiny_sdxl_path, device="cpu")
    data = encode(tiny_sd, *_images(2))
    ema = finetune(tiny_sd, data, FinetuneConfig(steps=1, batch=2, warmup=1), progress=False)
    with pytest.raises(StablekitError, match="another model"):
        with stablekit.use(tiny_sdxl, LoRAAdapter.from_peft(ema)):
            pass


def _run(args, capfd):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    out, err = capfd.readouterr()
    return exit_.value.code, out, err


def test_finetune_command_writes_a_lora_and_a_model_and_resumes(tiny_sd_path, tmp_path, capfd):
    folder = _folder(tmp_path / "set")
    common = ["--model", str(tiny_sd_path), "--steps", "4", "--batch", "2", "--warmup", "1", "--save-every", "2"]
    code, out, err = _run(["finetune", str(folder), "-o", str(tmp_path / "lora"), *common], capfd)
    assert code == 0, err
    lora = tmp_path / "lora" / "lora.safetensors"
    assert lora.is_file() and torch.load(tmp_path / "lora" / "checkpoint.pt", weights_only=False)["step"] == 4
    code, out, err = _run(
        ["generate", "a patch", "--model", str(tiny_sd_path), "--adapter", str(lora), "--steps", "2", "-o",
         str(tmp_path / "x.png")], capfd,
    )  # fmt: skip
    assert code == 0 and (tmp_path / "x.png").is_file(), err
    full = tmp_path / "full"
    code, out, err = _run(["finetune", str(folder), "-o", str(full), "--mode", "full", *common], capfd)
    assert code == 0, err
    first = stablekit.load(full, device="cpu").unet.state_dict()
    code, out, err = _run(["finetune", str(folder), "-o", str(full), "--mode", "full", *common], capfd)
    assert code == 0, err  # the finished run resumes at its last step: the same weights
    again = stablekit.load(full, device="cpu").unet.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    assert not torch.equal(first["conv_in.weight"], stablekit.load(tiny_sd_path).unet.state_dict()["conv_in.weight"])
    code, out, err = _run(["finetune", str(folder), "-o", str(full), "--mode", "lora", *common], capfd)
    assert code == 2 and "other settings" in err


def _bad_sets(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = _folder(tmp_path / "missing")
    (missing / "3.txt").unlink()
    mixed = _folder(tmp_path / "mixed")
    Image.new("RGB", (48, 48)).save(mixed / "2.png")
    big = _folder(tmp_path / "big", size=64)
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n")
    return {
        empty: "no images",
        missing: "has no caption",
        mixed: "of one size",
        big: "trains on 32x32",
        meta: "line 1",
        tmp_path / "nowhere": "not a folder",
    }


def test_bad_training_sets_are_one_line_exit_2_and_nothing_written(tiny_sd_path, tmp_path, capfd):
    for folder, message in _bad_sets(tmp_path).items():
        out = tmp_path / f"out-{folder.name}"
        code, _, err = _run(["finetune", str(folder), "-o", str(out), "--model", str(tiny_sd_path)], capfd)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (folder, err)
        assert not out.exists()
    with pytest.raises(StablekitError, match="mode"):
        FinetuneConfig(mode="dora")
    assert read_folder(_folder(tmp_path / "ok"))[1][0] == "a flat patch number 0"
