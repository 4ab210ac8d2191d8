"""stablekit.load(): folders (SD 1.x, SDXL), single files, hub ids, scheduler choice, and its errors."""

import socket
import time

import huggingface_hub.constants
import pytest
import torch
from conftest import make_tiny_sd, make_tiny_sdxl, run
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

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


@pytest.mark.parametrize(
    "name, cls",
    [
        ("model.safetensors", StableDiffusionPipeline),
        ("my-SDXL-base.safetensors", StableDiffusionXLPipeline),
        ("model.ckpt", StableDiffusionPipeline),
    ],
)
def test_single_file_routing(monkeypatch, tmp_path, tiny_sd, name, cls):
    seen = []

    def fake(klass, path, **kwargs):
        seen.append((klass, path, kwargs))
        return tiny_sd

    for pipeline_cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(pipeline_cls, "from_single_file", classmethod(fake))
    (tmp_path / name).write_bytes(b"")
    assert stablekit.load(tmp_path / name, device="cpu", config="org/configs") is tiny_sd
    [(klass, path, kwargs)] = seen
    assert klass is cls and path == str(tmp_path / name)
    assert kwargs["config"] == "org/configs" and kwargs["dtype"] == torch.float32


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
