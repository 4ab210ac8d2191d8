"""stablekit.load(): folders (SD 1.x, SDXL), single files, hub ids, scheduler choice, and its errors."""

import socket
import time

import huggingface_hub.constants
import pytest
import torch
from conftest import make_tiny_sd, make_tiny_sdxl, run
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

import stablekit
from stablekit import StablekitError, set_scheduler


@pytest.fixture
def no_network(monkeypatch):
    """Any DNS lookup or socket connect is recorded and fails; the list must stay empty."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "make, path_fixture, cls",
    [
        (make_tiny_sd, "tiny_sd_path", StableDiffusionPipeline),
        (make_tiny_sdxl, "tiny_sdxl_path", StableDiffusionXLPipeline),
    ],
)
def test_folder_round_trip(request, make, path_fixture, cls):
    pipe, ref = stablekit.load(request.getfixturevalue(path_fixture), device="cpu"), make()
    assert type(pipe) is cls
    assert pipe.dtype == torch.float32
    for name, module in ref.components.items():
        if isinstance(module, torch.nn.Module):
            loaded = getattr(pipe, name).state_dict()
            assert all(torch.equal(v, loaded[k]) for k, v in module.state_dict().items()), name
    # weights are equal bit for bit; safetensors' unaligned tensors may round a BLAS matmul by one ulp
    torch.testing.assert_close(run(pipe, steps=2), run(ref, steps=2), rtol=1e-4, atol=1e-4)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(StablekitError) as err:
        stablekit.load(tmp_path, device="cpu")
    assert "model_index.json" in one_line(err)


@pytest.mark.parametrize("name", ["missing-folder", "missing.safetensors", "notes.txt"])
def test_missing_or_non_model_path(tmp_path, name):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(StablekitError) as err:
        stablekit.load(tmp_path / name, device="cpu")
    assert name in one_line(err)


def test_scheduler_by_name_keeps_noise_schedule(tiny_sd_path):
    pipe = stablekit.load(tiny_sd_path, device="cpu", scheduler="euler")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    set_scheduler(pipe, "ddim")
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.beta_start == 0.00085
    assert stablekit.load(tiny_sd_path, device="cpu", scheduler="ddim").scheduler.config.steps_offset == 1


def test_unknown_scheduler(tiny_sd, tiny_sd_path):
    with pytest.raises(StablekitError) as err:
        set_scheduler(tiny_sd, "warp-drive")
    assert "warp-drive" in one_line(err) and "ddim" in str(err.value)
    with pytest.raises(StablekitError):
        stablekit.load(tiny_sd_path, device="cpu", scheduler="warp-drive")


def test_corrupt_single_file(tmp_path, no_network):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(StablekitError) as err:
        stablekit.load(path, device="cpu")
    assert str(path) in one_line(err)
    assert not no_network


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, names: dict) -> str:
    head, _, tail = rest.rpartition(".")
    return f"{names.get(head, head)}.{tail}"


def _unet_key(key: str, unet) -> str:
    """The original (CompVis) name of a diffusers UNet parameter: the inverse of diffusers' own conversion."""
    per_level = unet.config.layers_per_block + 1
    layers = {v: k for k, v in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    if key in layers.values():
        return next(ldm for ldm, d in layers.items() if d == key)
    part = key.split(".")
    if part[0] == "mid_block":
        index = 2 * int(part[2]) if part[1] == "resnets" else 1
        rest = ".".join(part[3:])
        return f"middle_block.{index}.{_rename(rest, RESNET) if part[1] == 'resnets' else rest}"
    level, kind, rest = int(part[1]), part[2], ".".join(part[4:])
    down = part[0] == "down_blocks"
    block = (
        f"input_blocks.{1 + level * per_level + int(part[3])}"
        if down
        else f"output_blocks.{level * per_level + int(part[3])}"
    )
    if kind == "resnets":
        return f"{block}.0.{_rename(rest, RESNET)}"
    if kind == "attentions":
        return f"{block}.1.{rest}"
    if down:  # downsamplers.0.conv
        return f"input_blocks.{1 + level * per_level + per_level - 1}.0.op.{part[-1]}"
    has_attention = "Attn" in unet.config.up_block_types[level]
    return f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}.conv.{part[-1]}"


def _vae_key(key: str, vae) -> str:
    """The original name of a diffusers VAE parameter."""
    layers = {v: k for k, v in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    if key in layers.values():
        return next(ldm for ldm, d in layers.items() if d == key)
    part = key.split(".")
    coder, level = part[0], int(part[2]) if part[1] != "mid_block" else 0
    if coder == "decoder" and part[1] == "up_blocks":
        level = len(vae.config.up_block_types) - 1 - level
    stage = "down" if part[1] == "down_blocks" else "up"
    if part[1] == "mid_block":
        rest = ".".join(part[4:])
        if part[2] == "attentions":
            return f"{coder}.mid.attn_1.{_rename(rest, VAE_ATTENTION)}"
        return f"{coder}.mid.block_{int(part[3]) + 1}.{_rename(rest, {'conv_shortcut': 'nin_shortcut'})}"
    if part[3] == "resnets":
        rest = ".".join(part[5:])
        return f"{coder}.{stage}.{level}.block.{part[4]}.{_rename(rest, {'conv_shortcut': 'nin_shortcut'})}"
    return f"{coder}.{stage}.{level}.{stage}sample.conv.{part[-1]}"


def save_single_file(pipe, path):
    """`pipe` (SD 1.x) as one checkpoint (.safetensors, or .ckpt: a pickled ``{"state_dict": ...}``) in the original
    single-file layout: ``model.diffusion_model.``, ``first_stage_model.`` (attention weights as 1x1 convolutions) and
    ``cond_stage_model.transformer.text_model.``. diffusers ships only the opposite conversion."""
    state = {f"model.diffusion_model.{_unet_key(k, pipe.unet)}": v for k, v in pipe.unet.state_dict().items()}
    for k, v in pipe.vae.state_dict().items():
        is_attention_matrix = ".attentions." in k and v.ndim == 2
        state[f"first_stage_model.{_vae_key(k, pipe.vae)}"] = v[..., None, None] if is_attention_matrix else v
    for k, v in pipe.text_encoder.state_dict().items():
        state[f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}"] = v
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.ckpt"])
def test_single_file_checkpoint_loads_with_the_same_weights(tmp_path, tiny_sd_path, no_network, name):
    """A real single-file checkpoint (no mock): saved from the tiny pipeline, loaded by stablekit.load with
    `config` naming the diffusers folder that holds the component configs, the tokenizer and the scheduler."""
    ref = make_tiny_sd()
    path = tmp_path / name
    save_single_file(ref, path)
    pipe = stablekit.load(path, device="cpu", config=str(tiny_sd_path))
    assert type(pipe) is StableDiffusionPipeline and not no_network
    for name in ("unet", "vae", "text_encoder"):
        loaded, saved = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert loaded.keys() >= saved.keys() - {"embeddings.position_ids"}, name
        assert all(torch.equal(loaded[k], v) for k, v in saved.items() if k in loaded), name
    torch.testing.assert_close(run(pipe, steps=2), run(ref, steps=2), rtol=1e-4, atol=1e-4)


def test_hub_id_offline_fails_fast(monkeypatch, no_network, tmp_path):
    # as if the process started with HF_HUB_OFFLINE=1: huggingface_hub reads it once, at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    start = time.monotonic()
    with pytest.raises(StablekitError) as err:
        stablekit.load("some-org/some-model", device="cpu")
    assert time.monotonic() - start < 10
    assert "HF_HUB_OFFLINE" in one_line(err)
    assert not no_network


def test_default_model_in_half_precision_has_every_part_in_it():
    """Found on a GPU (where float16 is the default): an fp32 MiniLM beside an fp16 VAE broke image-to-image."""
    pipe = stablekit.load(device="cpu", dtype="bfloat16")
    assert {m.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module)} == {torch.bfloat16}
