"""The README's plugin example runs as written, on a tiny pipeline, and has the effect it claims."""

import re
from pathlib import Path

import torch

import stablekit

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_has_one_plugin_example_of_20_to_30_lines():
    blocks = python_blocks()
    assert len(blocks) == 1
    code_lines = [line for line in blocks[0].splitlines() if line.strip()]
    assert 20 <= len(code_lines) <= 30
    assert "stablekit.Plugin" in blocks[0] and "stablekit.use(" in blocks[0]


def test_plugin_example_counts_unet_calls_and_steps_then_detaches(tiny_sd, monkeypatch, capsys):
    monkeypatch.setattr(stablekit, "load", lambda *args, **kwargs: tiny_sd)
    namespace = {"__name__": "readme_example"}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)

    profiler = namespace["profiler"]
    assert profiler.unet_calls.calls == 10  # one UNet call per step (guided halves batched)
    assert len(profiler.norms) == 10 and all(torch.isfinite(torch.tensor(profiler.norms)))
    assert len(set(profiler.norms)) > 1  # the latents change from step to step
    assert capsys.readouterr().out.strip() == "10 UNet calls, 10 steps"

    assert stablekit.attached(tiny_sd) == []  # the with block removed the plugin and its hook
    hooks = getattr(tiny_sd.unet, "_diffusers_hook", None)
    assert hooks is None or not hooks.hooks
    tiny_sd("a red star", num_inference_steps=2, output_type="latent", height=32, width=32)
    assert profiler.unet_calls.calls == 10  # no longer counting


def test_readme_is_a_guide_of_at_most_400_lines_of_prose_without_run_logs():
    text = README.read_text()  # table rows (one per method in the catalogue) are not counted
    assert len([line for line in text.splitlines() if not line.startswith("|")]) <= 400
    for log in (r"\bsession \d", r"\bissue \d", r"this CPU, shared", r"PAPERS\.md"):
        assert not re.search(log, text, flags=re.I), log
