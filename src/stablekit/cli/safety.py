"""``stablekit erase`` (concept erasure adapters) and ``stablekit audit`` (red-teaming a defense)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import StablekitError
from ..registry import CATALOGUE
from .common import check_output, given, model_and_device, refuse, spm_multiplier_option
from .defaults import DEFENSES

ATTACKS = CATALOGUE["attack"]


@click.command("erase")
@click.option(
    "--method",
    type=click.Choice(["uce", "spm", "advunlearn", "doco", "trce"]),
    default="uce",
    show_default=True,
    help="Erasure method: uce (closed-form cross-attention edit, seconds), spm (a trained rank-1 "
    "membrane, after 'One-dimensional Adapter to Rule Them All', 2024; minutes) or advunlearn (the text encoder "
    "trained against prompt attacks, after 'Defensive Unlearning with Adversarial Training for Robust Concept "
    "Erasure in Diffusion Models', 2024; minutes), doco (cross-attention trained adversarially toward --anchor, "
    "after 'Unlearning Concepts in Diffusion Model via Concept Domain Correction and Concept Preserving Gradient', "
    "2025; minutes) or trce (a cross-attention edit of the trigger tokens, then contrastive steering of the early "
    "steps, after 'TRCE: Towards Reliable Malicious Concept Erasure in Text-to-Image Diffusion Models', 2025; "
    "minutes).",
)
@click.option("--concept", "concepts", multiple=True, required=True, help="Concept to erase (repeatable).")
@click.option("--preserve", multiple=True, help="Concept to keep unchanged (repeatable; UCE only).")
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=None,
    help="Training iterations [default: 3000 for spm, 200 for advunlearn and trce's stage 2, 300 for doco].",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Learning rate [default: 1e-4 for spm and trce, 1e-3 for advunlearn and doco].",
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
    help="What SPM, AdvUnlearn or TRCE erases the concept toward [default: '', the word deleted; 'shape' suits a "
    "shape of the embedded default model].",
)
@click.option(
    "--keyword",
    multiple=True,
    help="TRCE: another word for the concept, erased with it (repeatable) [default: on the default model, the "
    "world's synonyms of the concept; else none].",
)
@click.option(
    "--anchor",
    default=None,
    help="DoCo: the concept the erased one should look like [default on the embedded model: the first other shape "
    "or colour of its world, circle for a shape, orange for a colour; required for other models].",
)
@click.option(
    "--cache",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="AdvUnlearn, DoCo: folder for their reference images and checkpoints, so that a stopped run resumes.",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="safetensors file to write.")
@model_and_device
def erase(
    method,
    concepts,
    preserve,
    iterations,
    lr,
    anchor_weight,
    eta,
    surrogate,
    anchor,
    keyword,
    cache,
    output,
    model,
    device,
):
    """Erase CONCEPTs from a model; use the file with `generate --adapter`."""
    from ..output import load_quietly, write_atomically

    check_output(output, "adapter.safetensors")
    if not all(c.strip() for c in concepts):
        raise StablekitError("--concept must not be empty")
    _check_erase(method, concepts, preserve)
    if model is None and method in ("advunlearn", "doco", "trce"):
        from ..redteam import audit

        audit.concept(concepts[0])  # the default model's world: a shape or a colour, checked before loading
    pipe = load_quietly(model, device, dtype="float32")  # training and closed-form edits want float32
    train = {"iterations": iterations, "lr": lr, "eta": eta, "surrogate": surrogate}
    train = {k: v for k, v in train.items() if v is not None}
    if method == "doco":
        edit = _doco(pipe, concepts[0], anchor, model, cache, train)
    elif method == "spm":
        edit = _spm(pipe, concepts[0], anchor_weight, train)
    elif method == "advunlearn":
        edit = _advunlearn(pipe, concepts[0], model, cache, train)
    elif method == "trce":
        edit = _trce(pipe, concepts[0], model, keyword, train)
    else:
        from ..safety import UCE

        edit = UCE(concepts=list(concepts), preserve=list(preserve)).fit(pipe)
    write_atomically(output, edit.save)
    click.echo(str(output))


def _check_erase(method: str, concepts, preserve) -> None:
    """One-line errors for options that do not fit `method`."""
    if method != "uce" and (len(concepts) > 1 or preserve):
        raise StablekitError(
            f"--method {method} erases one --concept per file (combine files with repeated --adapter) "
            "and takes no --preserve"
        )
    if method == "uce":
        refuse(
            given("iterations", "lr", "anchor_weight", "eta", "surrogate", "keyword", "cache"),
            "to --method uce, a closed-form edit: they set the trained methods",
        )
    if method == "spm":
        refuse(given("cache", "keyword"), "to --method spm")
    if method == "advunlearn":
        refuse(given("anchor_weight", "keyword"), "to --method advunlearn")
    if method != "doco":
        refuse(given("anchor"), f"to --method {method}: it sets DoCo's anchor concept")
    if method == "doco":
        refuse(
            given("anchor_weight", "eta", "surrogate", "keyword"),
            "to --method doco: they set SPM's, AdvUnlearn's and TRCE's training",
        )
    if method == "trce":
        refuse(given("anchor_weight", "eta", "cache"), "to --method trce")


def _spm(pipe, concept: str, anchor_weight: float, train: dict):
    from ..safety import SPM

    return SPM.train(
        pipe,
        concept,
        iterations=train.get("iterations", 3000),
        lr=train.get("lr", 1e-4),
        anchor_weight=anchor_weight,
        eta=train.get("eta", 1.0),
        surrogate=train.get("surrogate", ""),
    )


def _advunlearn(pipe, concept: str, model, cache, train: dict):
    """AdvUnlearn on the default model's world captions (with and without the concept), or generic templates on
    another model."""
    from ..safety import AdvUnlearn

    prompts = retain = None
    if model is None:
        from ..redteam import audit

        prompts, retain = audit.training_prompts(audit.concept(concept))
    return AdvUnlearn.train(pipe, concept, prompts=prompts, retain=retain, cache=cache, **train)


def _doco(pipe, concept: str, anchor, model, cache, train: dict):
    """DoCo on the default model's world captions (with and without the concept) toward its first other shape or
    colour unless --anchor says, or on generic templates toward --anchor on another model."""
    from ..safety import DoCo

    prompts = retain = None
    if model is None:
        from ..redteam import audit

        c = audit.concept(concept)
        prompts, retain = audit.training_prompts(c)
        anchor = c.others[0] if anchor is None else anchor
    if anchor is None:
        raise StablekitError("--method doco needs --anchor on a model other than the default (e.g. --anchor dog)")
    return DoCo.train(pipe, concept, anchor=anchor, prompts=prompts, retain=retain, cache=cache, **train)


def _trce(pipe, concept: str, model, keywords, train: dict):
    """TRCE on the default model's world captions (with the concept; without it, preserved), the world's synonyms
    as its further keywords unless given; generic templates on another model."""
    from ..safety import TRCE

    prompts = preserve = None
    if model is None:
        from ..redteam import audit

        c = audit.concept(concept)
        prompts, preserve = audit.training_prompts(c)
        keywords = keywords or c.paraphrases
    anchor = {"anchor": train.pop("surrogate")} if "surrogate" in train else {}
    return TRCE.train(pipe, concept, prompts=prompts, preserve=preserve, keywords=list(keywords), **anchor, **train)


def _check_adapter(audit, defense: str, adapter, spm_multiplier: float) -> None:
    if adapter is not None and defense not in audit.TRAINED:
        raise StablekitError(f"--adapter goes with a trained defense: --defense {' or '.join(audit.TRAINED)}")
    if spm_multiplier != 1 and defense != "spm":
        raise StablekitError("--spm-multiplier goes with --defense spm")
    if adapter is not None and not adapter.is_file():
        raise StablekitError(f"adapter file '{adapter}' does not exist")


@click.command("audit")
@click.option("--concept", required=True, help="Concept to test: a shape or colour of the default model's world.")
@click.option(
    "--defense",
    default="none",
    show_default=True,
    type=click.Choice(list(DEFENSES)),
    help="Defense given the concept word: none, blocklist (the word deleted from prompts), negative "
    "(prompt), sld, uce, safree, safree-negative "
    "(SAFREE with the word as negative prompt while it filters), spm, advunlearn, doco or trce.",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    default=None,
    help="File from `stablekit erase --method spm|advunlearn|doco|trce` for that --defense [default: train one].",
)
@spm_multiplier_option
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
@model_and_device
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
    from ..output import load_quietly, write_atomically
    from ..redteam import audit

    c = audit.concept(concept)
    if attack not in ATTACKS:
        raise StablekitError(f"unknown attack '{attack}'; choose one of: {', '.join(ATTACKS)}")
    if attack not in ("p4d", "unlearndiffatk"):
        refuse(given("iterations"), f"to --attack {attack}: it optimises nothing")
    _check_adapter(audit, defense, adapter, spm_multiplier)
    if json_path is not None:
        check_output(json_path, "audit.json")
    pipe = load_quietly(model, device)
    d = audit.defense(pipe, defense, c, adapter, spm_multiplier=spm_multiplier, adapter_file=adapter)
    if adapter is not None and d.plugins[0].name != defense:
        raise StablekitError(f"'{adapter}' is a {d.plugins[0].name} file, not {defense}")
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
