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
EDIT_STEPS = {**dict.fromkeys(INVERSION_GUIDANCE, 50), "infedit": 12}  # stablekit.edit.EDIT_STEPS
CS = {"steps": 8, "particles": 3}  # stablekit.restore.compressed_sensing.CSConfig
