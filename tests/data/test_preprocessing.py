"""Tests of tfscale.data.preprocessing: crops stay inside the image, fused decode equals decode-then-slice,
deterministic evaluation, shapes, dtypes and value ranges, normalisation against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from datahelpers import jpeg
from datahelpers import smooth_images
from tfscale.data import preprocessing


@pytest.fixture(scope="module")
def photo():
    img = smooth_images(1, 75, 100, seed=3)[0]
    return img, jpeg(img)


def test_sampled_crop_windows_stay_inside_the_image_and_in_range():
    shape = tf.constant([75, 100, 3])
    areas, ratios, found_any = [], [], False
    for seed in range(200):
        window, found = preprocessing.sample_crop_window(shape, (0.08, 1.0), (0.75, 4 / 3), seed=seed)
        y, x, h, w = window.numpy()
        assert 0 <= y and 0 <= x and h >= 1 and w >= 1
        assert y + h <= 75 and x + w <= 100
        if found:
            found_any = True
            areas.append(h * w / 7500)
            ratios.append(w / h)
    assert found_any
    # Pixel rounding makes the realised area / aspect slightly looser than the requested ranges.
    assert min(areas) >= 0.08 - 0.02 and max(areas) <= 1.0
    assert min(ratios) >= 0.75 * 0.9 and max(ratios) <= (4 / 3) / 0.9


def test_center_crop_window_matches_tpu_reference_numbers():
    # 224/256 of the shorter side 375 = 328 pixels, centred in a 500x375 image.
    y, x, h, w = preprocessing.center_crop_window(tf.constant([375, 500, 3])).numpy()
    assert (h, w) == (328, 328)
    assert (y, x) == ((375 - 328 + 1) // 2, (500 - 328 + 1) // 2)
    assert list(preprocessing.center_crop_window(tf.constant([28, 28]), 1.0).numpy()) == [0, 0, 28, 28]


def test_fused_center_crop_equals_decode_then_slice(photo):
    img, data = photo
    fused = preprocessing.decode_and_center_crop(tf.constant(data)).numpy()
    full = tf.io.decode_jpeg(data).numpy()
    side = int(224 / 256 * 75)
    y, x = (75 - side + 1) // 2, (100 - side + 1) // 2
    # decode_and_crop_jpeg may differ from a full decode by IDCT rounding only.
    assert fused.shape == (side, side, 3)
    assert np.abs(fused.astype(int) - full[y : y + side, x : x + side]).max() <= 2


def test_train_output_shape_dtype_range_and_flip(photo):
    _, data = photo
    out = preprocessing.preprocess_for_train(tf.constant(data), 32, seed=1)
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.0
    # area_range=(1, 1) can only give back the whole image, which the recipe treats as "no crop found" and
    # replaces by the centre crop (TPU reference); the output is that crop, or its mirror image.
    centre = preprocessing.preprocess_for_eval(tf.constant(data), 32, central_fraction=1.0).numpy()
    seen = set()
    for seed in range(12):
        out = preprocessing.preprocess_for_train(
            tf.constant(data), 32, area_range=(1.0, 1.0), central_fraction=1.0, seed=seed
        ).numpy()
        if np.abs(out - centre).max() < 1e-3:
            seen.add("plain")
        elif np.abs(out - centre[:, ::-1]).max() < 1e-3:
            seen.add("flipped")
        else:
            raise AssertionError("training output is neither the centre crop nor its mirror image")
    assert seen == {"plain", "flipped"}


def test_train_falls_back_to_center_crop_when_no_crop_is_found(photo):
    _, data = photo
    # An aspect range of 10-20 cannot fit a 75x100 image with >= 50% area: the sampler gives up.
    out = preprocessing.preprocess_for_train(
        tf.constant(data), 24, area_range=(0.5, 1.0), aspect_ratio_range=(10.0, 20.0), flip=False
    ).numpy()
    ref = preprocessing.preprocess_for_eval(tf.constant(data), 24).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_eval_is_deterministic_and_grey_becomes_three_channels():
    grey = smooth_images(1, 50, 60)[0][..., :1]
    data = tf.constant(jpeg(grey))
    a = preprocessing.preprocess_for_eval(data, 20).numpy()
    b = preprocessing.preprocess_for_eval(data, 20).numpy()
    assert a.shape == (20, 20, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[..., 0], a[..., 2])


def test_small_image_pad_and_crop_is_a_shifted_copy():
    img = smooth_images(1, 28, 28)[0]
    data = tf.constant(jpeg(img, quality=100))
    decoded = tf.io.decode_jpeg(data).numpy().astype(np.float32)
    for seed in range(5):
        out = preprocessing.preprocess_small_image_for_train(data, 28, pad_pixels=4, flip=False, seed=seed).numpy()
        padded = np.pad(decoded, [(4, 4), (4, 4), (0, 0)])
        matches = [
            (dy, dx) for dy in range(9) for dx in range(9)
            if np.array_equal(padded[dy : dy + 28, dx : dx + 28], out)
        ]
        assert matches, "pad-and-crop output is not a 28x28 window of the zero-padded image"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_normalize_matches_numpy(dtype):
    x = np.random.RandomState(0).randint(0, 256, size=(2, 4, 4, 3)).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = preprocessing.normalize_images(tf.constant(x), mean, std, dtype)
    assert out.dtype == tf.as_dtype(dtype) and out.shape == x.shape
    ref = (x / 255.0 - np.array(mean)) / np.array(std)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(out.numpy().astype(np.float32), ref, rtol=tol, atol=tol)
    unit = preprocessing.normalize_images(tf.constant([[0.0, 255.0, 127.5]]), (0, 0, 0), (1, 1, 1))
    np.testing.assert_allclose(unit.numpy(), [[0.0, 1.0, 0.5]], atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: preprocessing.preprocess_for_train(d, 0), "image_size=0"),
        (lambda d: preprocessing.preprocess_for_train(d, 8, area_range=(0.5, 0.1)), "area_range"),
        (lambda d: preprocessing.preprocess_for_train(d, 8, area_range=(0.0, 1.0)), "area_range"),
        (lambda d: preprocessing.preprocess_for_train(d, 8, aspect_ratio_range=(2, 1)), "aspect_ratio_range"),
        (lambda d: preprocessing.preprocess_for_train(d, 8, max_attempts=0), "max_attempts=0"),
        (lambda d: preprocessing.preprocess_for_eval(d, 8, central_fraction=1.5), "central_fraction=1.5"),
        (lambda d: preprocessing.preprocess_for_eval(d, 8, resize_method="lanczos9"), "resize_method"),
        (lambda d: preprocessing.normalize_images(tf.zeros([3]), stddev=(1, 0, 1)), "stddev"),
        (lambda d: preprocessing.normalize_images(tf.zeros([3]), mean=(1, 2)), "mean"),
        (lambda d: preprocessing.normalize_images(tf.zeros([3]), dtype="int8"), "dtype='int8'"),
        (lambda d: preprocessing.pad_and_random_crop(tf.zeros([4, 4, 3]), -1), "pad_pixels=-1"),
    ],
)
def test_bad_arguments_raise_named_errors(photo, call, match):
    with pytest.raises(ValueError, match=match):
        call(tf.constant(photo[1]))


def test_corrupt_bytes_raise_invalid_argument():
    with pytest.raises(tf.errors.InvalidArgumentError):
        preprocessing.preprocess_for_eval(tf.constant(b"not a jpeg"), 8)
