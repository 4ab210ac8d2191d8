"""The shipped attribute classifier: accuracy on fresh held-out world images, and predict's format."""

import pytest
import torch

from stablekit.default_model import classifier as C
from stablekit.default_model import world


@pytest.fixture(scope="module")
def heldout():
    x, scenes = C.batch(240, seed=31_337)  # neither training (10_000+) nor the benchmark's held-out seeds
    return x, scenes, C.predict(x)


def test_single_object_accuracy_at_least_98_percent(heldout):
    _, scenes, preds = heldout
    acc = C.accuracy(preds, scenes)["one_object"]
    assert acc["n"] >= 150
    for key in ("shapes", "colors", "background", "count"):
        assert acc[key] >= 0.98, (key, acc)


def test_two_object_set_accuracy(heldout):
    _, scenes, preds = heldout
    acc = C.accuracy(preds, scenes)["two_objects"]
    for key in ("shapes", "colors", "background", "count"):
        assert acc[key] >= 0.9, (key, acc)


def test_predict_format_and_inputs(heldout):
    x, scenes, _ = heldout
    ims = [world.render(s) for s in scenes[:4]]
    preds = C.predict(ims)
    assert len(preds) == 4
    for p in preds:
        assert set(p) == {"background", "shapes", "colors", "textures", "count"}
        assert p["count"] in (1, 2) and 1 <= len(p["shapes"]) <= p["count"]
        assert p["background"] in world.BACKGROUND_NAMES and set(p["colors"]) <= set(world.COLOR_NAMES)
    assert preds == C.predict(C.to_tensor(ims))  # PIL and tensor inputs agree
    # other sizes are resized to 64x64
    big = torch.nn.functional.interpolate(C.to_tensor(ims), size=(128, 128), mode="nearest")
    assert [p["shapes"] for p in C.predict(big)] == [p["shapes"] for p in preds]


def test_features_shape_and_determinism(heldout):
    x = heldout[0][:8]
    model = C.load_classifier()
    f = model.features(x)
    assert f.shape == (8, 256) and torch.equal(f, model.features(x))
