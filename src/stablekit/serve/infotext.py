"""AUTOMATIC1111's names for samplers and its "infotext", the ``parameters`` PNG chunk its clients read::

a red star
Negative prompt: blurry
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: ...
"""

from __future__ import annotations

# A1111 sampler name -> (our scheduler name, its config for the sampler's own schedule)
SAMPLERS = {
    "Euler a": ("euler-a", {}),
    "Euler": ("euler", {}),
    "LMS": ("lms", {}),
    "Heun": ("heun", {}),
    "DPM++ 2M": ("dpm++", {}),
    "DPM++ 2M SDE": ("dpm++", {"algorithm_type": "sde-dpmsolver++"}),
    "DDIM": ("ddim", {}),
    "DDPM": ("ddpm", {}),
    "PLMS": ("plms", {}),
    "UniPC": ("unipc", {}),
    "LCM": ("lcm", {}),
}
ALIASES = {
    "k_euler_a": "Euler a",
    "k_euler": "Euler",
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "ddim": "DDIM",
    "plms": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
    "DPM++ 2M Karras": "DPM++ 2M",  # before A1111 1.9 the schedule was part of the name
    "DPM++ 2M SDE Karras": "DPM++ 2M SDE",
}
# A1111 "scheduler" (schedule type) -> config of our schedulers; "automatic" keeps the sampler's own
SCHEDULES = {
    "automatic": {},
    "Automatic": {},
    "karras": {"use_karras_sigmas": True},
    "Karras": {"use_karras_sigmas": True},
}
KARRAS = ("euler", "euler-a", "lms", "heun", "dpm++")  # those of ours that take use_karras_sigmas


def a1111_name(ours: str) -> str:
    """The A1111 name of one of our scheduler names (ours itself if A1111 has none)."""
    name = ours.partition(":")[0]
    return next((a for a, (o, cfg) in SAMPLERS.items() if o == name and not cfg), name)


def infotext(meta: dict) -> str:
    """The A1111 ``parameters`` text of an image whose stablekit metadata is `meta`."""
    prompt = meta.get("prompt", meta.get("target", ""))
    lines = [str(prompt)]
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    fields = [
        ("Steps", meta.get("steps")),
        ("Sampler", a1111_name(str(meta["scheduler"])) if meta.get("scheduler") else None),
        ("Schedule type", "Karras" if "use_karras_sigmas=true" in str(meta.get("scheduler", "")) else "Automatic"),
        ("CFG scale", meta.get("guidance")),
        ("Seed", meta.get("seed")),
        ("Size", meta.get("size")),
        ("Model", meta.get("model")),
        ("Denoising strength", meta.get("strength")),
        ("Version", f"stablekit {meta['stablekit']}" if meta.get("stablekit") else None),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v not in (None, "")))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict:
    """The fields of an A1111 ``parameters`` text: Prompt, Negative prompt, and each ``Key: value``."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(lines) > 1 and ": " in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt = [line for line in body if not line.startswith("Negative prompt: ")]
    negative = [line.removeprefix("Negative prompt: ") for line in body if line.startswith("Negative prompt: ")]
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for item in last.split(", "):
        key, sep, value = item.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out
