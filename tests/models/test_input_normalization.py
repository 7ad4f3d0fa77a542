"""The models' input normalisation (issue 16): raw pixels in, the same logits as host-side normalisation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfscale import models
from tfscale.data import normalize_images


def _raw_images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name, size", [("resnet8", 28), ("resnet18", 64)])
def test_normalisation_in_the_model_matches_host_side_normalisation(name, size):
    old = models.build_model(name, num_classes=7, image_size=size)  # today's model: normalised float32 inputs
    new = models.build_model(name, num_classes=7, image_size=size, input_normalization="imagenet")
    assert new.get_layer("input_normalization") is not None
    assert len(old.weights) == len(new.weights)  # the normalisation layer has no weights
    new.set_weights(old.get_weights())
    raw = _raw_images(4, size)
    host = old(normalize_images(raw), training=False).numpy()  # the pipeline's old path: host-side float32
    for inputs in (raw, tf.constant(raw, tf.bfloat16), raw.astype(np.float32)):  # uint8, bfloat16, float32
        device = new(inputs, training=False).numpy()
        np.testing.assert_allclose(device, host, rtol=1e-4, atol=1e-4)
    # The layer itself computes exactly what normalize_images computes on the host.
    layer = models.input_normalization_layer("imagenet")
    np.testing.assert_allclose(layer(raw).numpy(), normalize_images(raw).numpy(), rtol=0, atol=1e-6)


def test_saved_model_carries_its_normalisation(tmp_path):
    model = models.resnet8(num_classes=5, image_size=16, input_normalization=((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)))
    raw = _raw_images(3, 16, seed=1)
    expected = model(raw, training=False).numpy()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(raw, verbose=0), expected, rtol=1e-5, atol=1e-5)
    # Feeding raw pixels is what it expects: normalised inputs give different logits.
    first = loaded.get_layer("input_normalization")(raw[:1].astype(np.float32)).numpy()
    np.testing.assert_allclose(first[0, 0, 0], (raw[0, 0, 0] / 255.0 - 0.5) / np.array([0.25, 0.5, 1.0]), atol=1e-5)


def test_default_keeps_todays_model():
    model = models.resnet8(num_classes=3, image_size=16)
    assert "input_normalization" not in [layer.name for layer in model.layers]
    assert model.inputs[0].dtype == "float32"


@pytest.mark.parametrize("bad", ["cifar", ((0.5, 0.5), (1, 1, 1)), ((0, 0, 0), (1, 0, 1)), 3])
def test_bad_input_normalization_names_the_value(bad):
    with pytest.raises(ValueError, match="input_normalization"):
        models.resnet8(image_size=16, input_normalization=bad)
