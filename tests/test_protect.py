"""stablekit.protect: the budget holds exactly after rounding, each attack raises its own objective above
the clean image's and above random signs of the same budget, SDS never back-propagates through the UNet,
DiffusionGuard changes only the protected region, bf16 runs, and the CLI's bad input is one line."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel
from PIL import Image

import stablekit
from stablekit import StablekitError, cli
from stablekit.protect import diffusionguard, eot, objective, protect, random_noise

EIGHT = 8 / 255


@pytest.fixture(scope="module")
def tiny(tiny_sd_path):
    return stablekit.load(tiny_sd_path, device="cpu")


@pytest.fixture(scope="module")
def trained():
    """The embedded default model: the semantic objectives need a denoiser that has learned something."""
    return stablekit.load(device="cpu")


def blocks(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(
        np.kron(rng.uniform(0, 255, (size // 4, size // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    )


def square(size: int, lo: int, hi: int) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def scene():
    from stablekit.default_model import world

    return next(iter(world.dataset(1, 5)))[0].resize((64, 64), Image.LANCZOS)


def levels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


CASES = [
    ("encoder", {}),
    ("encoder", {"mode": "away"}),
    ("semantic", {}),
    ("sds", {}),
    ("sds", {"mode": "max"}),
    ("diffusionguard", {"mask": square(32, 8, 24)}),
]


@pytest.mark.parametrize("method, kw", CASES, ids=[f"{m}-{k.get('mode', '')}" for m, k in CASES])
@pytest.mark.parametrize("eps", [EIGHT, 16 / 255])
def test_budget_holds_exactly_after_rounding(tiny, method, kw, eps):
    image = blocks(32)
    out = protect(tiny, image, method, eps=eps, steps=3, step_size=eps, progress=False, **kw)
    assert out.mode == "RGB" and out.size == image.size
    d = np.abs(levels(out) - levels(image))
    assert d.max() <= round(eps * 255) and d.max() >= round(eps * 255) - 1  # within, and the budget is used


def test_budget_holds_for_non_8bit_tensors_within_rounding(tiny):
    x = torch.rand(3, 32, 32)
    out = protect(tiny, x, "encoder", steps=2, progress=False)
    assert np.abs(levels(out) / 255 - x.permute(1, 2, 0).numpy()).max() <= EIGHT + 1e-6


def psnr(a, b) -> float:
    return 10 * np.log10(255**2 / np.mean((levels(a) - levels(b)) ** 2.0))


@pytest.mark.parametrize("method, kw", CASES, ids=[f"{m}-{k.get('mode', '')}" for m, k in CASES])
def test_psnr_floor_holds_after_rounding_and_binds(tiny, method, kw):
    image = blocks(32)
    for eps in (EIGHT, 16 / 255):
        out = protect(tiny, image, method, eps=eps, steps=3, step_size=eps, min_psnr=35, progress=False, **kw)
        assert np.abs(levels(out) - levels(image)).max() <= round(eps * 255)
        top = 99 if "mask" in kw else 36.5  # without a mask the floor binds: the budget is spent up to it
        assert 35 <= psnr(out, image) < top, (eps, psnr(out, image))
        base = random_noise(image, eps, mask=kw.get("mask"), min_psnr=35)
        assert 35 <= psnr(base, image) < top  # the baseline spends as much of the floor


def test_sds_under_a_psnr_floor_beats_random_of_the_same_floor(trained, scene):
    out = protect(trained, scene, "sds", steps=15, progress=False, min_psnr=35)
    clean, noise, ours = (objective(trained, y, scene, "sds") for y in (scene, random_noise(scene, min_psnr=35), out))
    assert ours - max(clean, noise) > 3 * abs(noise - clean), (clean, noise, ours)


def test_encoder_attack_beats_clean_and_random(tiny):
    image = blocks(32)
    for mode in ("toward", "away"):
        out = protect(tiny, image, "encoder", mode=mode, steps=15, progress=False)
        score = [objective(tiny, y, image, "encoder", mode=mode) for y in (image, random_noise(image), out)]
        assert score[2] > score[0] and score[2] > score[1], (mode, score)


@pytest.mark.parametrize("method, mode", [("semantic", "max"), ("semantic", "min"), ("sds", "min"), ("sds", "max")])
def test_semantic_attacks_beat_clean_and_random(trained, scene, method, mode):
    out = protect(trained, scene, method, mode=mode, steps=15, progress=False)
    clean, noise, ours = (objective(trained, y, scene, method, mode=mode) for y in (scene, random_noise(scene), out))
    assert ours > clean and ours > noise
    assert ours - max(clean, noise) > 3 * abs(noise - clean), (clean, noise, ours)  # clearly, not by chance


def test_diffusionguard_beats_clean_and_random(trained, scene):
    mask = square(64, 16, 48)
    out = protect(trained, scene, "diffusionguard", mask=mask, steps=20, step_size=1 / 255, progress=False)
    clean, noise, ours = (
        objective(trained, y, scene, "diffusionguard", mask=mask) for y in (scene, random_noise(scene, mask=mask), out)
    )
    assert ours > clean and ours > noise, (clean, noise, ours)


class UNetCalls:
    """Counts UNet forward calls, those made with gradients on, and backward passes through it."""

    def __init__(self, unet):
        self.forward = self.with_grad = self.backward = 0
        self.handles = [
            unet.register_forward_hook(self.on_forward),
            unet.register_full_backward_hook(self.on_backward),
        ]

    def on_forward(self, module, args, out):
        self.forward += 1
        self.with_grad += torch.is_grad_enabled()

    def on_backward(self, module, grad_in, grad_out):
        self.backward += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("method", ["sds", "semantic"])
def test_sds_never_backpropagates_through_the_unet(tiny, method):
    calls = UNetCalls(tiny.unet)
    try:
        protect(tiny, blocks(32), method, steps=4, progress=False)
    finally:
        calls.remove()
    assert calls.forward == 4
    if method == "sds":
        assert calls.with_grad == 0 and calls.backward == 0
    else:  # the guard does see the full attack's backward passes
        assert calls.with_grad == 4 and calls.backward == 4


def test_diffusionguard_changes_only_the_protected_region(tiny):
    image, mask = blocks(32), square(32, 8, 24)
    out = protect(tiny, image, "diffusionguard", mask=mask, steps=4, step_size=EIGHT, progress=False)
    d, inside = np.abs(levels(out) - levels(image)).max(-1), np.asarray(mask) > 127
    assert d[~inside].max() == 0 and d[inside].mean() > 4


@pytest.mark.parametrize("method", ["encoder", "semantic", "sds"])
def test_mask_confines_every_method(tiny, method):
    image, mask = blocks(32), square(32, 4, 20)
    out = protect(tiny, image, method, mask=mask, steps=2, step_size=EIGHT, progress=False)
    d, inside = np.abs(levels(out) - levels(image)).max(-1), np.asarray(mask) > 127
    assert d[~inside].max() == 0 and d[inside].max() == 8


def test_diffusionguard_needs_a_mask_with_both_regions(tiny):
    for mask in (None, Image.new("L", (32, 32), 255)):
        with pytest.raises(StablekitError, match="diffusionguard needs mask"):
            protect(tiny, blocks(32), "diffusionguard", mask=mask, steps=1, progress=False)


def test_diffusionguard_with_an_inpainting_unet(tiny_sd_path):
    """A 9-channel inpainting UNet gets [noise, mask, masked-image latents]; the perturbation stays inside."""
    pipe = stablekit.load(tiny_sd_path, device="cpu")
    config = dict(pipe.unet.config, in_channels=9)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(config)
    calls, seen = UNetCalls(pipe.unet), []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    image, mask = blocks(32), square(32, 8, 24)
    out = protect(pipe, image, "diffusionguard", mask=mask, steps=3, step_size=EIGHT, progress=False)
    handle.remove()
    calls.remove()
    d, inside = np.abs(levels(out) - levels(image)).max(-1), np.asarray(mask) > 127
    assert seen == [9] * 3 and calls.backward == 3 and d[~inside].max() == 0 and d[inside].max() == 8


def test_mask_augmentation_shrinks_inside_the_region():
    keep = np.asarray(square(64, 16, 48)) > 127
    rng = np.random.default_rng(0)
    masks = [diffusionguard.shrink_mask(keep, rng) for _ in range(20)]
    assert all(m.any() and not (m & ~keep).any() for m in masks)
    sizes = [m.sum() for m in masks]
    assert min(sizes) < keep.sum() and len(set(sizes)) > 10  # shrinks, by varying amounts


def test_bfloat16_path_runs_and_restores_the_pipeline(tiny):
    image, mask = blocks(32), square(32, 8, 24)
    seen = []
    handle = tiny.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    for method in ("semantic", "sds"):  # between them: VAE and UNet forward, backward through both, no_grad
        out = protect(tiny, image, method, dtype="bfloat16", steps=2, mask=mask, progress=False)
        d = np.abs(levels(out) - levels(image)).max(-1)
        assert d.max() <= 8 and d[np.asarray(mask) < 128].max() == 0
    handle.remove()
    assert seen == [torch.bfloat16] * 4
    assert tiny.unet.dtype == tiny.vae.dtype == torch.float32
    assert all(p.requires_grad for p in tiny.unet.parameters())


def test_eot_runs_and_jpeg_passes_the_gradient_straight_through(tiny):
    out = protect(tiny, blocks(32), "encoder", eot=True, steps=6, progress=False)
    assert np.abs(levels(out) - levels(blocks(32))).max() <= 8
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    y = eot.jpeg(x, 75, np.random.default_rng(0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and not torch.equal(y, x)
    assert eot.parse(["jpeg", "noise"]) == {"jpeg": 75, "noise": 0.03} and eot.parse(False) == {}
    with pytest.raises(StablekitError, match="unknown EOT"):
        eot.parse(["blur"])


def test_eot_draws_its_transformations(tiny, monkeypatch):
    calls = []
    jpeg = eot.TRANSFORMS["jpeg"]
    monkeypatch.setitem(eot.TRANSFORMS, "jpeg", lambda x, q, g: calls.append(q) or jpeg(x, q, g))
    protect(tiny, blocks(32), "sds", eot={"jpeg": 60}, steps=8, progress=False)
    assert 0 < len(calls) < 8 and set(calls) == {60}  # drawn against the identity, at the strength asked for


def test_sdxl_pipelines(tiny_sdxl_path):
    pipe = stablekit.load(tiny_sdxl_path, device="cpu")
    image, mask = blocks(32), square(32, 8, 24)
    for method in ("semantic", "sds", "diffusionguard"):
        out = protect(pipe, image, method, steps=1, mask=mask, progress=False)
        assert np.abs(levels(out) - levels(image)).max() <= 8


def test_same_seed_same_pixels(tiny):
    a, b, c = (protect(tiny, blocks(32), "semantic", steps=2, seed=s, progress=False) for s in (1, 1, 2))
    assert levels(a).tobytes() == levels(b).tobytes() != levels(c).tobytes()


def test_protect_is_a_plain_package_taking_the_pipeline_first(tiny):
    import stablekit.protect as package

    assert package is stablekit.protect and not callable(stablekit.protect) and "sds" in package.METHODS
    with pytest.raises(StablekitError, match="expected an image"):
        protect(blocks(32), tiny, "sds", steps=1, progress=False)  # the image where the pipeline goes


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(eps=0), "outside"),
        (dict(eps=1.5), "outside"),
        (dict(eps="8/0"), "not a number"),
        (dict(eps="big"), "not a number"),
        (dict(method="glaze"), "unknown protection method"),
        (dict(mask=square(16, 2, 8)), "mask is 16x16 but the image is 32x32"),
        (dict(mask=square(32, 0, 0)), "no pixel"),
        (dict(steps=-1), "steps"),
        (dict(mode="toward"), "no mode 'toward'"),
        (dict(dtype="int8"), "unknown dtype"),
        (dict(shrink=0.2), "no option 'shrink'"),
        (dict(eot=["blur"]), "unknown EOT"),
        (dict(min_psnr=0), "outside \\(0, 100\\) dB"),
        (dict(min_psnr="high"), "not a number"),
    ],
)
def test_bad_arguments_raise_one_line(tiny, kw, match):
    kw = dict(dict(method="sds", steps=1, progress=False), **kw)
    with pytest.raises(StablekitError, match=match) as err:
        protect(tiny, blocks(32), kw.pop("method"), **kw)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- CLI


def invoke(*args):
    return CliRunner().invoke(cli.cli, ["protect", *map(str, args)])


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    blocks(32).save(d / "in.png")
    square(32, 8, 24).save(d / "mask.png")
    square(16, 4, 12).save(d / "small.png")
    (d / "notes.txt").write_text("not an image")
    (d / "cut.png").write_bytes((d / "in.png").read_bytes()[:40])
    (tmp_path / "out").mkdir()
    return d, tmp_path / "out"


def test_cli_writes_a_protected_png(files, tiny_sd_path):
    d, out = files
    result = invoke(
        d / "in.png",
        "-o",
        out / "p.png",
        "--model",
        tiny_sd_path,
        "--method",
        "diffusionguard",
        "--mask",
        d / "mask.png",
        "--eps",
        "16/255",
        "--steps",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out / 'p.png'}\n"
    image = Image.open(out / "p.png")
    assert image.text["method"] == "diffusionguard" and image.text["steps"] == "2"
    d_ = np.abs(levels(image) - levels(Image.open(d / "in.png"))).max(-1)
    assert d_.max() <= 16 and d_[np.asarray(Image.open(d / "mask.png")) < 128].max() == 0


BAD = {
    "not an image": ("notes.txt", []),
    "unreadable file": ("cut.png", []),
    "missing file": ("nothing.png", []),
    "mask of another size": ("in.png", ["--mask", "{d}/small.png"]),
    "unreadable mask": ("in.png", ["--mask", "{d}/notes.txt"]),
    "eps zero": ("in.png", ["--eps", "0"]),
    "eps above one": ("in.png", ["--eps", "2"]),
    "eps not a number": ("in.png", ["--eps", "eight"]),
    "unknown method": ("in.png", ["--method", "glaze"]),
    "diffusionguard without mask": ("in.png", ["--method", "diffusionguard"]),
    "zero steps": ("in.png", ["--steps", "0"]),
    "psnr floor out of range": ("in.png", ["--min-psnr", "120"]),
    "bad mode": ("in.png", ["--method", "encoder", "--mode", "max"]),
    "output not png": ("in.png", ["-o", "{out}/p.jpg"]),
}


@pytest.mark.parametrize("name, args", BAD.values(), ids=BAD.keys())
def test_cli_bad_input_one_error_line_exit_2_no_file(files, tiny_sd_path, name, args):
    d, out = files
    args = [a.format(d=d, out=out) for a in args]
    if "-o" not in args:
        args += ["-o", out / "p.png"]
    result = invoke(d / name, "--model", tiny_sd_path, "--steps", "1", *args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert result.stdout == "" and list(out.iterdir()) == []
