"""Provenance: generative watermarks on the initial latents, keys and detection.

    key = make_key(pipe, "gaussian-shading")                 # or Key.load("key.json")
    with stablekit.use(pipe, watermark(key)):
        image = pipe("a red star on a gray background").images[0]
    print(detect(pipe, image, key))                           # score, p-value, decision, cost

Methods: :mod:`.tree_ring` (Tree-Ring, baseline), :mod:`.gaussian_shading` (Gaussian Shading,
baseline), :mod:`.seal` (SEAL, 2025), all on the initial latents; :mod:`.wouaf` (WOUAF, 2024), user
fingerprints in the VAE decoder's weights, read from the image without inversion; :mod:`.safe_sd` (Safe-SD,
2024), a key's encrypted pattern implanted through the UNet when the prompt holds the trigger word.
Attacks on them: :mod:`stablekit.eval.attacks`.
"""

from .detection import FPR, DetectionResult, Watermark, detect, make_key, recover_noise, watermark
from .gaussian_shading import GaussianShading
from .keys import Key
from .safe_sd import SafeSD
from .seal import SEAL
from .tree_ring import TreeRing
from .wouaf import WOUAF

__all__ = [
    "Key",
    "make_key",
    "watermark",
    "detect",
    "recover_noise",
    "DetectionResult",
    "Watermark",
    "TreeRing",
    "GaussianShading",
    "SEAL",
    "WOUAF",
    "SafeSD",
    "FPR",
]
