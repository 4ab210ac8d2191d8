"""DiffDIS: the edge target, the UNet features and their removal, the shipped head against the renderer's exact
masks (and its use of the features), and `stablekit segment`."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stablekit
from stablekit.cli import cli
from stablekit.restore import diffdis


@pytest.fixture(scope="module")
def pipe():
    return stablekit.load(device="cpu")


def test_edges_are_the_two_sided_boundary():
    mask = torch.zeros(1, 1, 10, 10)
    mask[..., 3:7, 3:7] = 1
    e = diffdis.edges(mask)
    assert e[0, 0, 2:8, 2:8].sum() == 36 - 4 and e[0, 0, 4:6, 4:6].sum() == 0  # 2-pixel ring, corners of 6x6 out
    assert diffdis.edges(torch.ones(1, 1, 5, 5)).sum() == 0


def test_features_are_the_up_blocks_and_hooks_are_removed(pipe):
    images, _ = diffdis.scenes(2, seed=1)
    feats = diffdis.features(pipe, images, 100)
    assert [f.shape[1] for f in feats] == [128, 64, 32] and all(len(f) == 2 for f in feats)
    assert all(not b._forward_hooks for b in pipe.unet.up_blocks)


def _iou(pred, true):
    return ((pred.bool() & true.bool()).sum() / (pred.bool() | true.bool()).sum()).item()


def test_shipped_head_segments_heldout_scenes_and_needs_the_features(pipe):
    images, masks = diffdis.scenes(12, seed=777)
    head, config = diffdis.load()
    prob = diffdis.segment(pipe, images, head, config)
    assert _iou(prob > 0.5, masks) > 0.75
    feats = [torch.zeros_like(f) for f in diffdis.features(pipe, images, config.timestep)]
    blind = torch.sigmoid(head(diffdis.head_input(feats, images, False))[:, :1])
    assert _iou(blind > 0.5, masks) < _iou(prob > 0.5, masks) - 0.1


def test_segment_command_writes_a_binary_mask(tmp_path):
    src, out = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(diffdis.scenes(1, seed=3)[0][0].mul(255).byte().permute(1, 2, 0).numpy()).save(src)
    res = CliRunner().invoke(cli, ["segment", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(out))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255} and (mask == 255).any()


@pytest.mark.parametrize(
    "image, message", [(Image.new("RGB", (48, 64)), "48x64"), (Image.new("RGBA", (64, 64)), "RGBA")]
)
def test_segment_refuses_bad_images(tmp_path, image, message):
    src, out = tmp_path / "in.png", tmp_path / "mask.png"
    image.save(src)
    res = CliRunner().invoke(cli, ["segment", str(src), "-o", str(out)])
    assert res.exit_code == 2 and message in res.output and not out.exists()
