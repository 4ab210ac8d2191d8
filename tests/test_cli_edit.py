"""`stablekit edit` and `stablekit invert` on the tiny model (32x32, 3 steps): PNGs, PSNR, one-line errors; and on
the embedded default model, what an edit changes as the judge (its attribute classifier) sees it."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.default_model import classifier, world
from stablekit.edit import reconstruct_image

SOURCE = "a red star on a gray background"


@pytest.fixture
def out_dir(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 32x32 PNG, a 31x30 PNG, a text file and a truncated PNG."""
    d = tmp_path_factory.mktemp("inputs")
    low = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = (torch.nn.functional.interpolate(low[None], size=32, mode="bilinear")[0] * 255).round().byte()
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    image.save(d / "in.png")
    image.crop((0, 0, 31, 30)).save(d / "odd.png")
    (d / "notes.txt").write_text("not an image")
    (d / "cut.png").write_bytes((d / "in.png").read_bytes()[:200])
    Image.new("L", (32, 32), 255).save(d / "mask.png")
    Image.new("L", (16, 32), 255).save(d / "small_mask.png")
    return d


def invoke(command, image, out, model, *args):
    return CliRunner().invoke(
        cli.cli, [command, str(image), "--model", str(model), "--steps", "3", "-o", str(out), *args]
    )


def test_edit_writes_png_with_metadata(inputs, out_dir, tiny_sd_path):
    path = out_dir / "edit.png"
    result = invoke(
        "edit",
        inputs / "in.png",
        path,
        tiny_sd_path,
        "--source",
        SOURCE,
        "--target",
        "a blue star on a gray background",
        "--method",
        "ddim",
        "--controller",
        "replace",
        "--blend",
        "red",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(path)]
    assert [p.name for p in out_dir.iterdir()] == ["edit.png"]  # no temp file left behind
    image = Image.open(path)
    assert image.size == (32, 32)
    assert image.text == {
        "source": SOURCE,
        "target": "a blue star on a gray background",
        "method": "ddim",
        "strength": "",
        "controller": "replace",
        "weights": "",
        "blend": "red",
        "steps": "3",
        "guidance": "7.5",
        "decoder_steps": "0",
        "decoder": "vae",
        "mask": "",
        "model": str(tiny_sd_path),
        "stablekit": stablekit.__version__,
    }


@pytest.mark.parametrize(
    "method, args",
    [
        ("edict", ["--controller", "reweight", "--weight", "star=2"]),
        ("nulltext", ["--controller", "refine"]),
        ("direct", []),
    ],
)
def test_edit_with_each_method(inputs, out_dir, tiny_sd_path, method, args):
    result = invoke(
        "edit",
        inputs / "in.png",
        out_dir / "e.png",
        tiny_sd_path,
        "--source",
        SOURCE,
        "--target",
        "a big red star on a gray background",
        "--method",
        method,
        *args,
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out_dir / "e.png").text["controller"] == (args[1] if args else "")


def test_invert_reconstructs_and_prints_psnr(inputs, out_dir, tiny_sd_path, tiny_sd):
    path = out_dir / "rec.png"
    result = invoke(
        "invert", inputs / "in.png", path, tiny_sd_path, "--prompt", SOURCE, "--method", "edict", "--reconstruct"
    )
    assert result.exit_code == 0, result.output
    line, db = result.stdout.splitlines(), reconstruct_image(tiny_sd, inputs / "in.png", SOURCE, "edict", steps=3)[1]
    assert line == [str(path), f"reconstruction PSNR: {db:.2f} dB"]
    image = Image.open(path)
    assert image.size == (32, 32) and image.text["psnr_db"] == f"{db:.2f}" and image.text["guidance"] == "3.0"


BAD = {
    "not an image": ("edit", "notes.txt", []),
    "unreadable file": ("edit", "cut.png", []),
    "missing file": ("invert", "nothing.png", ["--reconstruct"]),
    "wrong size": ("invert", "odd.png", ["--reconstruct"]),
    "unknown method": ("edit", "in.png", ["--method", "pti"]),
    "unalignable replace": (
        "edit",
        "in.png",
        ["--target", "a big red star on a gray background", "--controller", "replace"],
    ),
    "word not in target": ("edit", "in.png", ["--controller", "refine", "--weight", "green=2"]),
    "reweight without weight": ("edit", "in.png", ["--controller", "reweight"]),
    "weight not WORD=SCALE": ("edit", "in.png", ["--controller", "refine", "--weight", "red"]),
    "blend without controller": ("edit", "in.png", ["--blend", "red"]),
    "zero steps": ("invert", "in.png", ["--reconstruct", "--steps", "0"]),
    "negative guidance": ("edit", "in.png", ["--guidance", "-2"]),
    "strength over 1": ("edit", "in.png", ["--method", "edict", "--strength", "1.5"]),
    "strength for infedit": ("edit", "in.png", ["--method", "infedit", "--strength", "0.5"]),
    "output not png": ("invert", "in.png", ["--reconstruct", "-o", "{out}/rec.jpg"]),
    "no --reconstruct": ("invert", "in.png", []),
    "mask without the asymmetric decoder": ("edit", "in.png", ["--mask", "{inputs}/mask.png"]),
    "mask of another size": ("edit", "in.png", ["--decoder", "asymmetric", "--mask", "{inputs}/small_mask.png"]),
    "unknown decoder": ("edit", "in.png", ["--decoder", "jpeg"]),
}


@pytest.mark.parametrize("command, name, args", BAD.values(), ids=BAD.keys())
def test_bad_input_one_error_line_exit_2_no_file(inputs, out_dir, tiny_sd_path, command, name, args):
    prompts = ["--source", SOURCE, "--target", SOURCE] if command == "edit" else ["--prompt", SOURCE]
    result = invoke(
        command,
        inputs / name,
        out_dir / "out.png",
        tiny_sd_path,
        *prompts,
        *[a.format(out=out_dir, inputs=inputs) for a in args],
    )
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert result.stdout == "" and list(out_dir.iterdir()) == []


RED_OBJECTS = [
    world.Scene("gray", [world.Obj("star", "red", "solid", 32, 32, 18, 0)]),
    world.Scene("beige", [world.Obj("circle", "red", "solid", 30, 34, 16, 0)]),
]


@pytest.mark.parametrize("scene", RED_OBJECTS, ids=lambda s: s.objects[0].shape)
def test_edit_recolours_the_object_and_keeps_the_rest(tmp_path, scene):
    """Red to blue on the embedded model: the judge sees blue where it saw red, the same shape and background,
    and the pixels change on the object far more than around it."""
    obj = scene.objects[0]
    source = f"a red {obj.shape} on a {scene.background} background"
    world.render(scene, np.random.default_rng(0)).save(tmp_path / "in.png")
    args = ["--source", source, "--method", "direct", "--controller", "replace", "--steps", "10", "--device", "cpu"]
    for name, target in (("same.png", source), ("blue.png", source.replace("red", "blue"))):
        result = CliRunner().invoke(
            cli.cli, ["edit", str(tmp_path / "in.png"), *args, "--target", target, "-o", str(tmp_path / name)]
        )
        assert result.exit_code == 0, result.output
    images = [Image.open(tmp_path / name).convert("RGB") for name in ("in.png", "same.png", "blue.png")]
    before, same, blue = classifier.predict(images)
    assert before["colors"] == same["colors"] == ["red"] and blue["colors"] == ["blue"]
    assert before["shapes"] == same["shapes"] == blue["shapes"] == [obj.shape]
    assert before["background"] == same["background"] == blue["background"] == scene.background
    change = np.abs(np.asarray(images[2], float) - np.asarray(images[0], float)).mean(-1)
    mask = world.object_mask(obj)
    assert change[mask > 0.99].mean() > 4 * change[mask < 0.01].mean()  # measured: 9x (circle)
