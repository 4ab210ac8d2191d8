"""The ``stablekit`` command line: ``stablekit generate|keygen|detect|edit|invert ...``, ``stablekit bench NAME ...``.

Every error is one line on stderr, ``error: ...``: bad input (a :class:`StablekitError` or a usage
error) exits with 2, anything unexpected with 1. ``STABLEKIT_DEBUG=1`` re-raises for a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from . import __version__, safety, use
from .edit import EDIT_GUIDANCE, EDIT_STEPS, GUIDANCE, PromptToPrompt, UnifiedAttentionControl, edit, reconstruct_image
from .errors import StablekitError
from .latents import read_image
from .output import generation_metadata, load_quietly, parse_size, save_png, write_atomically
from .pipeline import DEFAULT_MODEL
from .pipeline import guidance_rescale as guidance_rescale_for
from .protect import DEFAULTS as PROTECT_DEFAULTS
from .protect import METHODS as PROTECTIONS
from .protect import eot as protect_eot
from .protect import options as protect_options
from .protect import parse_eps, parse_psnr, protect
from .provenance import FPR, Key, detect, make_key, watermark
from .provenance.detection import latent_shape
from .redteam import audit
from .registry import CATALOGUE, build, parse

SCHEDULERS = CATALOGUE["scheduler"]
ACCELS = CATALOGUE["accel"]
GUARDS = CATALOGUE["guard"]
WATERMARKS = CATALOGUE["watermark"]
ATTACKS = CATALOGUE["attack"]


def _fail(message: str, code: int):
    lines = [line for line in str(message).splitlines() if line.strip()] or ["(no message)"]
    click.echo(f"error: {lines[0].strip()}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """A click group whose errors are printed as one line each."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except StablekitError as e:
            _fail(str(e), 2)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            _fail(e.format_message() + hint, 2)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort:
            _fail("interrupted", 1)
        except Exception as e:
            if os.environ.get("STABLEKIT_DEBUG") == "1":
                raise
            _fail(f"{type(e).__name__}: {e}", 1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, name="stablekit")
@click.version_option(package_name="stablekit")
def cli():
    """Fast, safe, traceable Stable Diffusion."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``stablekit = stablekit.cli:main``)."""
    cli.main(argv, prog_name="stablekit")


# ---------------------------------------------------------------- generate

_MODEL_HELP = "Diffusers folder, .safetensors/.ckpt file or hub id [default: the embedded model]."


def _model_option(f):
    """--model, shared by every command that loads a pipeline."""
    return click.option("--model", default=None, help=_MODEL_HELP)(f)


def _model_and_device(f):
    """--model and --device, shared by every command that runs a pipeline."""
    device = click.option("--device", default=None, help="cuda, mps or cpu [default: the best available].")
    return _model_option(device(f))


def _spm_multiplier_option(f):
    """--spm-multiplier, shared by the commands that attach SPM membranes (generate, audit)."""
    return click.option(
        "--spm-multiplier",
        type=click.FloatRange(min=0),
        default=1.0,
        show_default=True,
        help="Multiply each SPM membrane's strength (its facilitated transport) by this.",
    )(f)


def _decoder_steps_option(f):
    """--decoder-steps, shared by the commands that invert images to latents (detect, edit, invert)."""
    return click.option("--decoder-steps", default=0, show_default=True, help="Decoder-inversion steps (0: off).")(f)


def _given(*names: str) -> list[str]:
    """The options among the parameter `names` that the command line gave (not left at their defaults), as --flags."""
    ctx = click.get_current_context()
    sources = {name: ctx.get_parameter_source(name) for name in names}
    return [
        f"--{name.replace('_', '-')}" for name, src in sources.items() if src not in (None, ParameterSource.DEFAULT)
    ]


def _refuse(flags: list[str], reason: str) -> None:
    """A one-line error if any of `flags` was given: they do not apply, and are never silently ignored."""
    if flags:
        raise StablekitError(f"{' and '.join(flags)} {'do' if len(flags) > 1 else 'does'} not apply {reason}")


def output_paths(output: Path, count: int) -> list[Path]:
    """Where `count` images go: `output` itself for one, ``stem-0.png, stem-1.png, ...`` beside it for more."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _check_generate(prompts, output: Path, steps: int, guidance: float, n: int) -> None:
    if not any(p.strip() for p in prompts):
        raise StablekitError('no prompt given; write it after the command, e.g. stablekit generate "a red circle"')
    if steps <= 0:
        raise StablekitError(f"--steps {steps}: the number of denoising steps must be at least 1, e.g. --steps 25")
    if guidance < 0:
        raise StablekitError(f"--guidance {guidance}: guidance must be >= 0 (1 turns it off; 7.5 is usual)")
    if n <= 0:
        raise StablekitError(f"--n {n}: the number of images per prompt must be at least 1")
    _check_output(output)


def _check_output(output: Path, example: str = "out.png") -> None:
    if output.is_dir():
        raise StablekitError(f"output '{output}' is a folder; give a file name, e.g. -o {output / example}")
    suffix = Path(example).suffix
    if output.suffix.lower() != suffix:
        raise StablekitError(f"output '{output}' must be a {suffix} file, e.g. -o {example}")
    if not output.parent.is_dir():
        raise StablekitError(f"output folder '{output.parent}' does not exist; create it or choose another -o")


def _watermark_plugin(method: str | None, key_file: Path | None, wh: tuple[int, int] | None):
    """(the watermark plugin or None, the image size): the key's size unless --size agrees with it."""
    if key_file is None:
        if method:
            raise StablekitError(
                f"--watermark {method} needs --key-file KEY; make one with `stablekit keygen {method} -o key.json`"
            )
        return None, wh
    key = Key.load(key_file)
    if method and key.method != method:
        raise StablekitError(
            f"key file '{key_file}' holds a {key.method} key, not {method}; "
            f"pass --watermark {key.method} or a {method} key"
        )
    plugin = watermark(key)
    size = plugin.image_size[::-1]
    if wh and wh != size:
        raise StablekitError(
            f"--size {wh[0]}x{wh[1]} but key file '{key_file}' is for {plugin.size_text()} images; "
            f"drop --size or make a key with --size {wh[0]}x{wh[1]}"
        )
    return plugin, size


@cli.command()
@click.argument("prompts", nargs=-1, metavar="PROMPT...")
@click.option(
    "-o",
    "--output",
    default="out.png",
    show_default=True,
    type=click.Path(path_type=Path),
    help="PNG file; several images become STEM-0.png, STEM-1.png, ... beside it.",
)
@click.option("--seed", default=0, show_default=True, help="Image i uses seed+i.")
@click.option("--steps", default=25, show_default=True, help="Denoising steps.")
@click.option("--guidance", default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option(
    "--guidance-rescale",
    type=float,
    default=None,
    help="Rescale of the guided prediction (0: off) [default: 0.7 for models whose schedule has zero "
    "terminal SNR, like the embedded default; else 0].",
)
@click.option("--size", default=None, metavar="WxH", help="Image size [default: the model's native size].")
@click.option("--n", default=1, show_default=True, help="Images per prompt.")
@click.option(
    "--scheduler",
    default=None,
    metavar="NAME[:k=v,...]",
    help=f"Sampler, one of {', '.join(SCHEDULERS)}; k=v override its config [default: the model's own].",
)
@click.option(
    "--accel",
    "accels",
    multiple=True,
    metavar="NAME[:k=v,...]",
    help=f"Attach an acceleration plugin, one of {', '.join(ACCELS)} (repeatable).",
)
@click.option(
    "--guard",
    "guards",
    multiple=True,
    metavar="NAME[:k=v,...]",
    help=f"Attach a safety guard or erasure, one of {', '.join(GUARDS)}, e.g. safree:concepts=[star] (repeatable).",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Concept-erasure file from `stablekit erase` (repeatable).",
)
@_spm_multiplier_option
@click.option(
    "--watermark",
    "method",
    type=click.Choice(list(WATERMARKS)),
    default=None,
    help="Watermark the images with --key-file's key.",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Watermark key from `stablekit keygen`; alone it implies --watermark with the key's method.",
)
@click.option("--negative", default=None, help="Negative prompt.")
@_model_and_device
def generate(
    prompts,
    output,
    model,
    seed,
    steps,
    guidance,
    guidance_rescale,
    size,
    n,
    scheduler,
    accels,
    guards,
    adapters,
    spm_multiplier,
    method,
    key_file,
    negative,
    device,
):
    """Generate images from PROMPT(s); print each written path."""
    wh = parse_size(size)
    _check_generate(prompts, output, steps, guidance, n)
    if guidance_rescale is not None and not 0 <= guidance_rescale <= 1:
        raise StablekitError(f"--guidance-rescale {guidance_rescale}: must lie in [0, 1]")
    if guidance <= 1:
        _refuse(_given("negative", "guidance_rescale"), f"at --guidance {guidance:g}: classifier-free guidance is off")
    plugins = _generation_plugins(accels, guards, adapters, spm_multiplier)
    mark, wh = _watermark_plugin(method, key_file, wh)
    pipe = load_quietly(model, device, scheduler=scheduler)
    use(pipe, *plugins, *([mark] if mark else []))
    w, h = wh or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    jobs = [p for p in prompts for _ in range(n)]
    rescale = guidance_rescale_for(pipe) if guidance_rescale is None else guidance_rescale
    specs = {"accel": list(accels), "guard": list(guards), "adapter": [p.name for p in adapters]}
    meta = dict(
        negative=negative,
        steps=steps,
        guidance=guidance,
        guidance_rescale=rescale,
        size=(w, h),
        scheduler=scheduler,
        model=model,
        specs=specs,
    )
    call = dict(negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=rescale)
    for i, (prompt, path) in enumerate(zip(jobs, output_paths(output, len(jobs)), strict=False)):
        pipe.set_progress_bar_config(disable=None, desc=f"image {i + 1}/{len(jobs)}")
        g = torch.Generator("cpu").manual_seed(seed + i)
        image = pipe(prompt, height=h, width=w, generator=g, **call).images[0]
        save_png(image, path, generation_metadata(pipe, prompt, seed + i, **meta))
        click.echo(str(path))


def _generation_plugins(accels, guards, adapters, spm_multiplier: float) -> list:
    """The plugins of `generate`'s --accel, --guard and --adapter options, built (so checked) before any loading."""
    plugins = [build(spec, ACCELS, "accel") for spec in accels]
    plugins += [build(spec, GUARDS, "guard") for spec in guards]
    plugins += [safety.load_adapter(path, spm_multiplier) for path in adapters]
    if spm_multiplier != 1 and not any(isinstance(p, safety.SPM) for p in plugins):
        raise StablekitError("--spm-multiplier scales SPM membranes: give one with --adapter")
    return plugins


@cli.command()
@click.option(
    "--method",
    type=click.Choice(["uce", "spm"]),
    default="uce",
    show_default=True,
    help="Erasure method: uce (closed-form cross-attention edit, seconds) or spm (a trained rank-1 "
    "membrane, after 'One-dimensional Adapter to Rule Them All', 2024; minutes).",
)
@click.option("--concept", "concepts", multiple=True, required=True, help="Concept to erase (repeatable).")
@click.option("--preserve", multiple=True, help="Concept to keep unchanged (repeatable; UCE only).")
@click.option(
    "--iterations", type=click.IntRange(min=1), default=3000, show_default=True, help="SPM training iterations."
)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True, help="SPM learning rate."
)
@click.option(
    "--anchor-weight",
    type=click.FloatRange(min=0),
    default=1000.0,
    show_default=True,
    help="SPM latent-anchoring weight (the paper's 1000; 1 on the embedded default model).",
)
@click.option(
    "--eta",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="SPM erasing guidance: the target is N - eta (P - N) [default: 1, the paper's].",
)
@click.option(
    "--surrogate",
    default=None,
    help="What SPM erases the concept toward [default: '', the paper's; 'shape' suits a shape of the "
    "embedded default model].",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="safetensors file to write.")
@_model_and_device
def erase(method, concepts, preserve, iterations, lr, anchor_weight, eta, surrogate, output, model, device):
    """Erase CONCEPTs from a model; use the file with `generate --adapter`."""
    _check_output(output, "adapter.safetensors")
    if not all(c.strip() for c in concepts):
        raise StablekitError("--concept must not be empty")
    if method == "spm" and (len(concepts) > 1 or preserve):
        raise StablekitError(
            "--method spm erases one --concept per file (combine files with repeated --adapter) "
            "and takes no --preserve"
        )
    if method == "uce":
        _refuse(
            _given("iterations", "lr", "anchor_weight", "eta", "surrogate"),
            "to --method uce, a closed-form edit: they set SPM's training",
        )
    pipe = load_quietly(model, device, dtype="float32")  # training and closed-form edits want float32
    if method == "spm":
        edit = safety.SPM.train(
            pipe,
            concepts[0],
            iterations=iterations,
            lr=lr,
            anchor_weight=anchor_weight,
            eta=eta or 1.0,
            surrogate=surrogate or "",
        )
    else:
        edit = safety.UCE(concepts=list(concepts), preserve=list(preserve)).fit(pipe)
    write_atomically(output, edit.save)
    click.echo(str(output))


@cli.command("audit")
@click.option("--concept", required=True, help="Concept to test: a shape or colour of the default model's world.")
@click.option(
    "--defense",
    default="none",
    show_default=True,
    type=click.Choice(list(audit.DEFENSES)),
    help="Defense given the concept word: none, blocklist (the word deleted from prompts), negative "
    "(prompt), sld, uce, safree, safree-negative "
    "(SAFREE with the word as negative prompt while it filters) or spm.",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    default=None,
    help="SPM membrane from `stablekit erase --method spm` for --defense spm [default: train one].",
)
@_spm_multiplier_option
@click.option(
    "--attack",
    default="arithmetic",
    show_default=True,
    metavar="|".join(ATTACKS),
    help=f"Attack, one of {', '.join(ATTACKS)}.",
)
@click.option(
    "--prompts",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Direct prompts (one object with the concept) to generate and attack.",
)
@click.option(
    "--iterations",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Optimisation steps per prompt of p4d and unlearndiffatk.",
)
@click.option("--steps", default=25, show_default=True, type=click.IntRange(min=1), help="Denoising steps.")
@click.option("--guidance", default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", default=0, show_default=True, help="Prompt and noise seed.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
@_model_and_device
def audit_command(
    concept,
    defense,
    adapter,
    spm_multiplier,
    attack,
    prompts,
    iterations,
    steps,
    guidance,
    seed,
    json_path,
    model,
    device,
):
    """Red-team a defense: how often the judge (the default model's attribute classifier) sees CONCEPT, before
    and after an attack."""
    c = audit.concept(concept)
    if attack not in ATTACKS:
        raise StablekitError(f"unknown attack '{attack}'; choose one of: {', '.join(ATTACKS)}")
    if attack not in ("p4d", "unlearndiffatk"):
        _refuse(_given("iterations"), f"to --attack {attack}: it optimises nothing")
    if (adapter is not None or spm_multiplier != 1) and defense != "spm":
        raise StablekitError("--adapter and --spm-multiplier go with --defense spm")
    if adapter is not None and not adapter.is_file():
        raise StablekitError(f"adapter file '{adapter}' does not exist")
    if json_path is not None:
        _check_output(json_path, "audit.json")
    pipe = load_quietly(model, device)
    d = audit.defense(pipe, defense, c, adapter, spm_multiplier=spm_multiplier)
    if adapter is not None and list(d.plugins[0].config.concepts) != [c.word]:
        raise StablekitError(f"'{adapter}' erases {list(d.plugins[0].config.concepts)}, not '{c.word}'")
    direct = audit.prompts(c, prompts, seed).direct
    hits = audit.present(audit.generate(pipe, d, direct, steps=steps, guidance=guidance, seed=seed)[0], c)
    res = {
        "concept": c.word,
        "defense": defense,
        "attack": attack,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "direct": audit.rate(hits),
    }
    res["attack_" + attack] = audit.attack(
        pipe, attack, d, c, direct, hits, steps=steps, guidance=guidance, seed=seed, iterations=iterations
    )
    if json_path is not None:
        write_atomically(json_path, lambda p: Path(p).write_text(json.dumps(res, indent=2)))
    post = res["attack_" + attack]["post_attack"]
    for label, r in (("before attack", res["direct"]), (f"after {attack}", post)):
        click.echo(
            f"{c.word} under {defense}, {label}: concept rate {r['rate']:.3f} "
            f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['k']}/{r['n']})"
        )


# ---------------------------------------------------------------- watermark keys and detection


@cli.command()
@click.argument("method", metavar="METHOD[:k=v,...]")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="JSON key file to write; keep it private: it detects and forges the watermark.",
)
@_model_option
@click.option(
    "--size", default=None, metavar="WxH", help="Size of the images to mark [default: the model's native size]."
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Derive the secret from this seed: reproducible but guessable, for tests only [default: a random secret].",
)
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def keygen(method, output, model, size, seed, force):
    """Write a new watermark key for METHOD (tree-ring, gaussian-shading or seal; k=v override its defaults)."""
    name, _, params = parse(method, WATERMARKS, "watermark method", lambda cls: cls.default_params)
    wh = parse_size(size)
    _check_output(output, "key.json")
    if output.exists() and not force:
        raise StablekitError(
            f"key file '{output}' exists; images marked with it need it to be detected: "
            "choose another -o, or pass --force"
        )
    w, h = wh or (None, None)
    key = make_key(load_quietly(model, "cpu"), name, height=h, width=w, seed=seed, **params)
    write_atomically(output, key.save, mode=0o600)
    click.echo(str(output))


@cli.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE...")
@click.option(
    "--key-file",
    "key_files",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Key from `stablekit keygen` (repeatable: the best-matching one is reported).",
)
@click.option("--steps", default=50, show_default=True, help="Steps of the inversion to the initial noise.")
@click.option(
    "--inversion", type=click.Choice(["ddim", "edict"]), default="ddim", show_default=True, help="Inversion method."
)
@_decoder_steps_option
@click.option("--fpr", default=FPR, show_default=True, help="False-positive rate of the decision.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
@_model_and_device
def detect_command(images, key_files, model, steps, inversion, decoder_steps, fpr, as_json, device):
    """Is each IMAGE watermarked with one of the keys? Print score, p-value, decision and message or key."""
    if steps <= 0:
        raise StablekitError(f"--steps {steps}: the number of inversion steps must be at least 1, e.g. --steps 50")
    if decoder_steps < 0:
        raise StablekitError(f"--decoder-steps {decoder_steps}: must be >= 0 (0 turns decoder inversion off)")
    if not 0 < fpr < 1:
        raise StablekitError(f"--fpr {fpr}: a false-positive rate lies between 0 and 1, e.g. --fpr 1e-6")
    keys = [Key.load(path) for path in key_files]
    marks = [watermark(key) for key in keys]
    for path, mark in zip(key_files, marks, strict=False):
        if (mark.name, mark.shape) != (marks[0].name, marks[0].shape):
            raise StablekitError(
                f"key files '{key_files[0]}' ({marks[0].name}, {marks[0].size_text()}) and '{path}' "
                f"({mark.name}, {mark.size_text()}) differ; give keys of one method and size"
            )
    pictures = [read_image(path) for path in images]
    for path, picture in zip(images, pictures, strict=False):
        if picture.size != marks[0].image_size[::-1]:
            raise StablekitError(
                f"image '{path}' is {picture.width}x{picture.height} but the key is for "
                f"{marks[0].size_text()} images; detect at the size it was generated"
            )
    pipe = load_quietly(model, device)
    shape = latent_shape(pipe, *marks[0].image_size)[0]
    if shape != marks[0].shape:
        raise StablekitError(
            f"key file '{key_files[0]}' was made for another model: its latents are "
            f"{marks[0].shape}, this model's {shape}; pass the key's --model"
        )
    found = []
    for path, picture in zip(images, pictures, strict=False):
        result = detect(pipe, picture, keys, steps=steps, inversion=inversion, decoder_steps=decoder_steps, fpr=fpr)
        key_file = str(key_files[result.user or 0])
        found.append(dict(image=str(path), key_file=key_file, **dataclasses.asdict(result)))
        if not as_json:
            extra = (f"; key file {key_file}" if result.user is not None else "") + (
                f"; message {result.message}" if result.message else ""
            )
            click.echo(f"{path}: {result}{extra}")
    if as_json:
        click.echo(json.dumps(found, indent=1))


# ---------------------------------------------------------------- edit and invert


def _check_inversion(steps: int, guidance: float | None, decoder_steps: int, output: Path) -> None:
    if steps <= 0:
        raise StablekitError(f"--steps {steps}: the number of inversion steps must be at least 1, e.g. --steps 50")
    if guidance is not None and guidance < 0:
        raise StablekitError(f"--guidance {guidance}: guidance must be >= 0 (1 turns it off)")
    if decoder_steps < 0:
        raise StablekitError(f"--decoder-steps {decoder_steps}: must be >= 0 (0 turns decoder inversion off)")
    _check_output(output)


def parse_weights(weights: tuple[str, ...]) -> dict[str, float]:
    """``("word=2.5", ...)`` -> ``{"word": 2.5, ...}``."""
    out = {}
    for item in weights:
        word, _, scale = item.rpartition("=")
        try:
            value = float(scale)
        except ValueError:
            value = None
        if not word.strip() or value is None:
            raise StablekitError(f"--weight '{item}' is not WORD=SCALE; write it like --weight red=2")
        out[word.strip()] = value
    return out


def _controller(
    name: str | None, weights: tuple[str, ...], blend: tuple[str, ...], method: str
) -> PromptToPrompt | None:
    if name is None:
        if weights or blend:
            raise StablekitError("--weight and --blend need a --controller (replace, refine or reweight)")
        return None
    if name == "reweight" and not weights:
        raise StablekitError("--controller reweight needs at least one --weight WORD=SCALE, e.g. --weight red=2")
    kind = UnifiedAttentionControl if method == "infedit" else PromptToPrompt
    return kind("replace" if name == "replace" else "refine", weights=parse_weights(weights), blend=blend)


def _inversion_options(
    guidance: dict[str, float],
    steps: int | None = 50,
    method_help: str = "Inversion method.",
    steps_help: str = "DDIM steps of the inversion.",
):
    """--method (a key of `guidance`, the methods' default guidance), --steps (default `steps`), --guidance,
    --decoder-steps, --model and --device."""

    def decorate(f):
        for option in reversed(
            [
                click.option(
                    "--method",
                    type=click.Choice(list(guidance)),
                    default="direct",
                    show_default=True,
                    help=method_help,
                ),
                click.option("--steps", type=int, default=steps, show_default=steps is not None, help=steps_help),
                click.option(
                    "--guidance",
                    type=float,
                    default=None,
                    help="Classifier-free guidance [default: the method's paper's, "
                    + ", ".join(f"{m} {g:g}" for m, g in guidance.items())
                    + "].",
                ),
                _decoder_steps_option,
                _model_and_device,
            ]
        ):
            f = option(f)
        return f

    return decorate


@cli.command("edit")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--source", required=True, help="Prompt that describes IMAGE.")
@click.option("--target", required=True, help="Prompt that describes the edited image.")
@click.option(
    "--controller",
    type=click.Choice(["replace", "refine", "reweight"]),
    default=None,
    help="Prompt-to-prompt attention control (with --method infedit, InfEdit's unified attention control): "
    "replace (word swap), refine (added words), reweight (refine with --weight) [default: none].",
)
@click.option("--weight", "weights", multiple=True, metavar="WORD=SCALE", help="Scale a target word's attention.")
@click.option("--blend", multiple=True, metavar="WORD", help="Local blend: edit only where WORD attends.")
@click.option(
    "--strength",
    type=float,
    default=None,
    help="Fraction of the schedule the edit regenerates [default: edict 0.8 (its paper), the other inversions 1].",
)
@click.option(
    "-o", "--output", default="edit.png", show_default=True, type=click.Path(path_type=Path), help="PNG file to write."
)
@_inversion_options(
    EDIT_GUIDANCE,
    None,
    "Editing method: an inversion, or infedit (none needed; --guidance is the target branch's, the source's is 1).",
    f"Diffusion steps [default: the method's paper's, 50, infedit {EDIT_STEPS['infedit']}].",
)
def edit_command(
    image,
    source,
    target,
    controller,
    weights,
    blend,
    strength,
    output,
    method,
    steps,
    guidance,
    decoder_steps,
    model,
    device,
):
    """Edit IMAGE from the --source prompt to the --target prompt; print the written path."""
    steps = EDIT_STEPS[method] if steps is None else steps
    _check_inversion(steps, guidance, decoder_steps, output)
    plugin = _controller(controller, weights, blend, method)
    picture = read_image(image)
    pipe = load_quietly(model, device)
    if plugin is not None:
        plugin.prepare(pipe.tokenizer, source, target)  # fail before the inversion, not after it
    out = edit(
        pipe,
        picture,
        source,
        target,
        method,
        controller=plugin,
        steps=steps,
        guidance=guidance,
        strength=strength,
        decoder_steps=decoder_steps,
    )
    guidance = EDIT_GUIDANCE[method] if guidance is None else guidance
    save_png(
        out,
        output,
        dict(
            source=source,
            target=target,
            method=method,
            strength=strength or "",
            controller=controller or "",
            weights=",".join(weights),
            blend=",".join(blend),
            steps=steps,
            guidance=guidance,
            decoder_steps=decoder_steps,
            model=model or DEFAULT_MODEL,
            stablekit=__version__,
        ),
    )
    click.echo(str(output))


@cli.command("invert")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt that describes IMAGE.")
@click.option(
    "--reconstruct",
    is_flag=True,
    help="Regenerate IMAGE from its inversion, write it to -o and print its PSNR against IMAGE.",
)
@click.option(
    "-o",
    "--output",
    default="reconstruction.png",
    show_default=True,
    type=click.Path(path_type=Path),
    help="PNG file to write.",
)
@_inversion_options(GUIDANCE)
def invert_command(image, prompt, reconstruct, output, method, steps, guidance, decoder_steps, model, device):
    """Invert IMAGE under --prompt; with --reconstruct, write the reconstruction and print its PSNR."""
    if not reconstruct:
        raise StablekitError("stablekit invert writes reconstructions only: add --reconstruct")
    _check_inversion(steps, guidance, decoder_steps, output)
    picture = read_image(image)
    pipe = load_quietly(model, device)
    out, db = reconstruct_image(
        pipe, picture, prompt, method, steps=steps, guidance=guidance, decoder_steps=decoder_steps
    )
    guidance = GUIDANCE[method] if guidance is None else guidance
    save_png(
        out,
        output,
        dict(
            prompt=prompt,
            method=method,
            steps=steps,
            guidance=guidance,
            decoder_steps=decoder_steps,
            psnr_db=f"{db:.2f}",
            model=model or DEFAULT_MODEL,
            stablekit=__version__,
        ),
    )
    click.echo(str(output))
    click.echo(f"reconstruction PSNR: {db:.2f} dB")


# ---------------------------------------------------------------- protect


@cli.command("protect")
@click.argument("image", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    default="protected.png",
    show_default=True,
    type=click.Path(path_type=Path),
    help="PNG file to write (lossless: JPEG would erase much of the protection).",
)
@click.option(
    "--method",
    type=click.Choice(list(PROTECTIONS)),
    default="sds",
    show_default=True,
    help="encoder (PhotoGuard), semantic (AdvDM), sds (Diff-Protect score distillation), diffusionguard "
    "(against inpainting; needs --mask).",
)
@click.option(
    "--mask",
    type=click.Path(path_type=Path),
    default=None,
    help="Image of IMAGE's size, white over the region to protect: only those pixels change.",
)
@click.option(
    "--eps", default="8/255", show_default=True, help="L-infinity budget in [0, 1] pixel units, e.g. 8/255 or 16/255."
)
@click.option(
    "--min-psnr",
    type=float,
    default=None,
    help="Also keep PSNR >= this many dB (e.g. 35; 8/255 filling the ball gives 30.1) [default: no floor].",
)
@click.option(
    "--steps",
    type=int,
    default=None,
    help="PGD steps [default: the method's, "
    + ", ".join(f"{m} {d['steps']}" for m, d in PROTECT_DEFAULTS.items())
    + "].",
)
@click.option("--step-size", default=None, help="PGD step in pixel units, e.g. 1/255 [default: the method's].")
@click.option(
    "--mode",
    default=None,
    help="encoder: toward|away; semantic, sds: max|min [default: the method's, "
    + ", ".join(f"{m} {d['mode']}" for m, d in PROTECT_DEFAULTS.items() if "mode" in d)
    + "].",
)
@click.option("--prompt", default=None, help="Prompt of the denoiser's loss [default: the method's].")
@click.option(
    "--eot",
    multiple=True,
    type=click.Choice([*protect_eot.TRANSFORMS, "all"]),
    help="Optimise through this transformation too, drawn at random per step (repeatable).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default=None,
    help="Precision of the VAE and UNet during the attack [default: the model's].",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random start, timesteps and noise.")
@_model_and_device
def protect_command(
    image, output, method, mask, eps, min_psnr, steps, step_size, mode, prompt, eot, dtype, seed, model, device
):
    """Protect IMAGE against diffusion mimicry and editing; print the written path."""
    budget = parse_eps(eps, "--eps")
    parse_psnr(min_psnr, "--min-psnr")
    step = None if step_size is None else parse_eps(step_size, "--step-size")
    if steps is not None and steps < 1:
        raise StablekitError(f"--steps {steps}: the number of PGD steps must be at least 1, e.g. --steps 100")
    if "prompt" not in PROTECT_DEFAULTS[method]:
        _refuse(_given("prompt"), f"to --method {method}: it uses no prompt")
    settings = protect_options(method, steps, step, mode, prompt)
    _check_output(output)
    picture = read_image(image)
    region = None
    if mask is not None:
        region = read_image(mask)
        if region.size != picture.size:
            raise StablekitError(
                f"mask '{mask}' is {region.width}x{region.height} but image '{image}' is "
                f"{picture.width}x{picture.height}; give a mask of the image's size"
            )
    elif method == "diffusionguard":
        raise StablekitError(
            "--method diffusionguard needs --mask MASK: white over the region to protect "
            "(what an inpainting editor keeps)"
        )
    pipe = load_quietly(model, device)
    out = protect(
        pipe,
        picture,
        method,
        eps=budget,
        steps=settings["steps"],
        step_size=settings["step_size"],
        mask=region,
        eot=list(eot),
        dtype=dtype,
        mode=mode,
        prompt=prompt,
        seed=seed,
        min_psnr=min_psnr,
    )
    save_png(
        out,
        output,
        dict(
            method=method,
            eps=f"{budget:.6g}",
            min_psnr=min_psnr or "",
            steps=settings["steps"],
            step_size=f"{settings['step_size']:.6g}",
            mode=settings.get("mode", ""),
            eot=",".join(eot),
            seed=seed,
            model=model or DEFAULT_MODEL,
            stablekit=__version__,
        ),
    )
    click.echo(str(output))


# ---------------------------------------------------------------- serve


@cli.command()
@click.option("--model", default=None, help=_MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (not loopback: needs a token).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    default=None,
    help="File whose first line is the token clients must send (Bearer, or as the HTTP Basic password).",
)
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(min=1), help="Jobs that may wait.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Jobs database and images [default: $XDG_DATA_HOME/stablekit/serve].",
)
@click.option("--device", default=None, help="cuda, mps or cpu [default: the best available].")
def serve(model, host, port, token_file, max_queue, data_dir, device):
    """Run the HTTP service: the native API (/docs), the AUTOMATIC1111 API (/sdapi/v1) and the studio (/)."""
    from . import serve as service

    settings = service.Settings(
        data_dir=data_dir or service.default_data_dir(),
        model=model,
        device=device,
        token=service.read_token(token_file),
        max_queue=max_queue,
    )
    if settings.token is None and not service.is_loopback(host):
        raise StablekitError(f"--host {host} is reachable from other machines: give --token-file, or bind 127.0.0.1")
    service.run(settings, host, port)


# ---------------------------------------------------------------- batch


@cli.command("batch")
@click.argument("jobs", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for images/ and the manifest.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes (with --ray: actors) [default: 1; with --ray, one per GPU, else one per node].",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on Ray: alone, a local Ray instance; with an ADDRESS (auto, HOST:6379, ray://HOST:10001), that cluster.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads per worker.")
@_model_and_device
def batch_command(jobs, out, workers, ray_address, threads, model, device):
    """Generate every row of JOBS (JSON lines) into --out, skipping rows already there; print a summary."""
    from . import batch

    summary = batch.run(jobs, out, model=model, device=device, workers=workers, threads=threads, ray=ray_address)
    click.echo(
        f"{summary['written']} written, {summary['skipped']} already done, of {summary['rows']} rows: "
        f"{summary['manifest']}"
    )


# ---------------------------------------------------------------- bench


def benchmark_dirs() -> list[Path]:
    """Folders searched for benchmarks: ``./benchmarks``, then the source checkout's ``benchmarks/``."""
    dirs = []
    for d in (Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"):
        if d.is_dir() and d.resolve() not in dirs:
            dirs.append(d.resolve())
    return dirs


def find_benchmark(name: str) -> Path:
    """The file of benchmark `name` (``-`` read as ``_``), or a StablekitError listing those available."""
    found = {}
    for d in reversed(benchmark_dirs()):  # the first folder wins
        found.update({f.stem: f for f in d.glob("*.py") if not f.stem.startswith("_")})
    stem = name.removesuffix(".py").replace("-", "_")
    if stem not in found:
        raise StablekitError(f"unknown benchmark '{name}'; available: {', '.join(sorted(found)) or 'none'}")
    return found[stem]


def load_benchmark(name: str):
    """The module of benchmark `name`, imported (it has a ``main(args)``), with its folder on ``sys.path`` for the
    modules it shares with the other benchmarks (``benchmarks/_common.py``)."""
    path = find_benchmark(name)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"stablekit_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise StablekitError(f"benchmark '{path}' has no main(args) function")
    return module


@cli.command(context_settings=dict(ignore_unknown_options=True, allow_extra_args=True, allow_interspersed_args=False))
@click.argument("name")
@click.pass_context
def bench(ctx, name):
    """Run benchmarks/NAME.py's main(args) with the remaining ARGS (an int it returns is the exit code)."""
    return load_benchmark(name).main(list(ctx.args))


if __name__ == "__main__":
    main()
