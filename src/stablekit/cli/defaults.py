"""The library's names and defaults that help texts and option choices show, written out here so that
``stablekit CMD --help`` imports no method package (each would import torch); tests/test_cli_help.py checks
every one against the library's own value."""

DEFAULT_MODEL = "stablekit-default"  # stablekit.pipeline.DEFAULT_MODEL
FPR = 1e-6  # stablekit.provenance.FPR
DEFENSES = (  # redteam.audit
    "none",
    "blocklist",
    "negative",
    "sld",
    "uce",
    "safree",
    "safree-negative",
    "spm",
    "advunlearn",
    "doco",
    "trce",
)
PROTECTIONS = {  # stablekit.protect.DEFAULTS' steps and modes, by method
    "encoder": {"steps": 100, "mode": "toward"},
    "semantic": {"steps": 100, "mode": "max"},
    "sds": {"steps": 100, "mode": "min"},
    "diffusionguard": {"steps": 800},
}
EOT = ("jpeg", "resize", "noise")  # stablekit.protect.eot.TRANSFORMS
INVERSION_GUIDANCE = {"ddim": 7.5, "edict": 3.0, "nulltext": 7.5, "direct": 7.5}  # stablekit.edit.GUIDANCE
EDIT_GUIDANCE = {**INVERSION_GUIDANCE, "infedit": 2.3}  # stablekit.edit.EDIT_GUIDANCE
DECODERS = ("vae", "asymmetric")  # stablekit.edit.asymmetric_decoder.DECODERS
EDIT_STEPS = {**dict.fromkeys(INVERSION_GUIDANCE, 50), "infedit": 12}  # stablekit.edit.EDIT_STEPS
RECIPES = {  # stablekit.train.RECIPES: name -> (parameters with defaults, paper)
    "plain": (
        "none",
        "the teacher's recipe (v-prediction, zero terminal SNR, Min-SNR-5, EMA) without noise assignment",
    ),
    "immiscible": ("none", "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment (2024)"),
    "scalelong": (
        "kappa=0.5, scheme=constant",
        "ScaleLong: Towards More Stable Training of Diffusion Model via Scaling Network Long Skip Connection (2023)",
    ),
    "corruption": (
        "share=1.0, gamma=0.1",
        "Slight Corruption in Pre-training Data Makes Better Diffusion Models (2024)",
    ),
    "spd": ("c1=1.59, c2=0.0086, m=2.0", "Image generation with shortest path diffusion (2023)"),
    "umd": (
        "no_noise_prob=0.5, mask_ratio_no_noise=0.75, mask_ratio=0.375, patch=2",
        "Unified Auto-Encoding with Masked Diffusion (2024)",
    ),
    "rrcm": (
        "gap=50, temperature=0.2, weight=0.5",
        "Robust Representation Consistency Model via Contrastive Denoising (2025)",
    ),
}
CS = {"steps": 8, "particles": 3}  # stablekit.restore.compressed_sensing.CSConfig
