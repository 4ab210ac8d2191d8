"""The spine's shared pieces: the catalogue of plugin kinds and the one PIL <-> tensor conversion."""

import numpy as np
import pytest
import torch
from PIL import Image

import stablekit
from stablekit.latents import psnr, to_pil, to_tensor, tree_map
from stablekit.pipeline import STANDARD_SCHEDULERS
from stablekit.registry import CATALOGUE, INDEX, KINDS, Table, build, register


def test_the_catalogue_is_full_after_import_and_keyed_by_each_class_name():
    assert set(CATALOGUE) == set(KINDS) and all(CATALOGUE[kind] for kind in KINDS)
    for kind, table in CATALOGUE.items():
        for name, cls in table.items():
            assert isinstance(cls, type)
            assert name in STANDARD_SCHEDULERS or cls.name == name, (kind, name, cls)
    assert {"deepcache", "encoder-propagation", "feature-inheritance"} <= set(CATALOGUE["accel"])
    assert {"hb", "ghvb", "searched", "ddim"} <= set(CATALOGUE["scheduler"])
    assert type(build("deepcache:interval=3", CATALOGUE["accel"], "accel")).__name__ == "DeepCache"


def test_register_files_a_class_and_refuses_a_taken_name_or_an_unknown_kind(monkeypatch):
    monkeypatch.setitem(CATALOGUE, "accel", Table("accel", INDEX["accel"]))

    @register("accel")
    class Faster(stablekit.Plugin):
        name = "faster"

    assert CATALOGUE["accel"]["faster"] is Faster
    assert register("accel")(Faster) is Faster  # the same class again changes nothing
    with pytest.raises(ValueError, match="already Faster"):
        register("accel", "faster")(type("Other", (), {}))
    with pytest.raises(ValueError, match="no name"):
        register("accel")(type("Nameless", (), {}))
    with pytest.raises(ValueError, match="unknown plugin kind"):
        register("quantizer")


def test_to_tensor_and_to_pil_invert_each_other_on_8_bit_images():
    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    x = to_tensor(Image.fromarray(pixels))
    assert x.shape == (3, 6, 10) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(x)), pixels) and np.array_equal(np.asarray(to_pil(x[None])), pixels)
    y = x + torch.tensor(0.4 / 255) * torch.sign(torch.randn(x.shape))  # within half a level: rounds back
    assert np.array_equal(np.asarray(to_pil(y)), pixels)
    assert np.asarray(to_pil(torch.full((3, 2, 2), 2.0))).min() == 255  # out of range: clamped
    assert psnr(x, x) == float("inf") and abs(psnr(np.zeros(4), np.full(4, 0.1)) - 20) < 1e-9


def test_tree_map_maps_leaves_at_the_same_keys_of_every_tree():
    a = {"x": 1, "added": {"t": 2, "ids": 3}}
    b = {"x": 10, "added": {"t": 20, "ids": 30}}
    assert tree_map(lambda u, v: u + v, a, b) == {"x": 11, "added": {"t": 22, "ids": 33}}


def test_load_adapter_refuses_missing_unreadable_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    from stablekit.errors import StablekitError
    from stablekit.registry import load_adapter

    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"method": "no-such-method"})
    (tmp_path / "text.safetensors").write_text("not tensors")
    for path, message in (
        (tmp_path / "gone.safetensors", "does not exist"),
        (tmp_path / "text.safetensors", "not a readable safetensors file"),
        (foreign, "is not an adapter file"),
    ):
        with pytest.raises(StablekitError, match=message):
            load_adapter(path)
