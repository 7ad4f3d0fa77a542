"""Issue 16: uint8/bfloat16 pixels out of the pipeline (normalised in the model), reproducible stateless crops, and
the training cache of decoded images (`cache="decoded"`, scripts/train.py --cache)."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from datahelpers import jpeg
from datahelpers import smooth_images
from datahelpers import write_records
from tfscale.data import normalize_images
from tfscale.data import pipeline
from tfscale.data import records


def _epoch(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture
def own_records(tmp_path):
    """24 records of 48x40 smooth colour JPEGs, labels 1..24, 4 shards, in a directory this test may delete."""
    info = records.convert_arrays(smooth_images(24, 48, 40, seed=5), np.arange(24), str(tmp_path / "r"), "train", 4,
                                  progress=False)
    return info["file_pattern"], str(tmp_path / "r")


def test_uint8_and_bfloat16_pixels_match_the_host_normalised_output(own_records):
    pattern, _ = own_records
    common = dict(seed=7, deterministic=True, repeat=False, shuffle_buffer_size=24)
    x_float, y_float = _epoch(pipeline.imagenet_dataset(pattern, True, 24, 8, **common))  # float32, normalised
    x_u8, y_u8 = _epoch(pipeline.imagenet_dataset(pattern, True, 24, 8, dtype="uint8", **common))
    x_bf, y_bf = _epoch(pipeline.imagenet_dataset(pattern, True, 24, 8, dtype="bfloat16", normalize=False, **common))
    assert x_u8.dtype == np.uint8 and x_bf.dtype == tf.bfloat16.as_numpy_dtype
    np.testing.assert_array_equal(y_u8, y_float)
    np.testing.assert_array_equal(y_bf, y_float)  # same records, same crops and flips (stateless, same seed)
    # uint8 is rounded to the nearest level: at most half a level (0.5 / 255 / stddev) from the float output.
    np.testing.assert_allclose(normalize_images(x_u8).numpy(), x_float, atol=0.5 / 255 / 0.224 + 1e-5)
    # bfloat16 holds 0..255 with 8 bits of precision: within 1 level of the rounded uint8 pixels.
    assert np.abs(x_bf.astype(np.float32) - x_u8.astype(np.float32)).max() <= 1.0


def test_stateless_crops_are_reproducible_and_change_between_iterations(own_records):
    pattern, _ = own_records
    ds = pipeline.imagenet_dataset(pattern, True, 24, 8, dtype="uint8", seed=3, deterministic=True, repeat=False,
                                   shuffle_buffer_size=24)
    again = pipeline.imagenet_dataset(pattern, True, 24, 8, dtype="uint8", seed=3, deterministic=True, repeat=False,
                                      shuffle_buffer_size=24)
    first, first_again = _epoch(ds), _epoch(again)
    np.testing.assert_array_equal(first[0], first_again[0])  # a new pipeline with the same seed: the same epoch
    np.testing.assert_array_equal(first[1], first_again[1])
    second = _epoch(ds)  # a second iteration: new shuffle, new crops
    assert not np.array_equal(second[1], first[1])
    by_label_1 = first[0][np.argsort(first[1])]
    by_label_2 = second[0][np.argsort(second[1])]
    assert np.mean([not np.array_equal(a, b) for a, b in zip(by_label_1, by_label_2)]) > 0.5


def test_cache_gives_the_first_epoch_of_no_cache_then_new_crops(own_records):
    pattern, directory = own_records
    common = dict(dtype="uint8", seed=11, deterministic=True, repeat=False, shuffle_buffer_size=24,
                  area_range=(0.3, 1.0))
    x_ref, y_ref = _epoch(pipeline.imagenet_dataset(pattern, True, 24, 8, **common))
    cached = pipeline.imagenet_dataset(pattern, True, 24, 8, cache="decoded", **common)
    x1, y1 = _epoch(cached)
    # The same records in the same order with the same crop windows and flips. The cached images are cropped from
    # whole decoded images, the uncached ones by the fused decode-and-crop: libjpeg's chroma upsampling differs at
    # the crop edges by a few levels.
    np.testing.assert_array_equal(y1, y_ref)
    diff = np.abs(x1.astype(np.int16) - x_ref.astype(np.int16))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8
    # Epoch 2 reads no file (they are gone) and draws new random crops of the cached images.
    shutil.rmtree(directory)
    x2, y2 = _epoch(cached)
    assert sorted(y2) == list(range(24))
    by_label_1, by_label_2 = x1[np.argsort(y1)], x2[np.argsort(y2)]
    assert np.mean([not np.array_equal(a, b) for a, b in zip(by_label_1, by_label_2)]) > 0.5
    # Against the class's own pixels (smooth images): every epoch-2 crop is still of the right image.
    x_eval, y_eval = x_ref[np.argsort(y_ref)], np.sort(y_ref)
    np.testing.assert_array_equal(np.sort(y2), y_eval)
    assert np.abs(by_label_2.mean(axis=(1, 2)) - x_eval.mean(axis=(1, 2))).mean() < 30


def test_cache_with_repeat_and_pad_and_crop(own_records):
    pattern, _ = own_records
    ds = pipeline.imagenet_dataset(pattern, True, 16, 8, dtype="uint8", cache="decoded", train_crop="pad_and_crop",
                                   pad_pixels=2, seed=1)
    labels = np.concatenate([y.numpy() for _, y in ds.take(9)])  # 72 images: 3 epochs of 24 through the cache
    assert len(labels) == 72 and np.bincount(labels, minlength=24).min() >= 1  # every cached image came back


def _bad_records(tmp_path):
    imgs = smooth_images(9, 24, 24)
    good = [records.make_example(jpeg(imgs[i]), i + 1, 24, 24, 3).SerializeToString() for i in range(8)]
    full = jpeg(imgs[8])
    bad = [records.make_example(full[: len(full) // 2], 9, 24, 24, 3).SerializeToString(),  # truncated JPEG
           b"not an example",
           records.make_example(jpeg(imgs[0]), 99, 24, 24, 3).SerializeToString()]  # label out of range
    mixed = good[:3] + bad[:1] + good[3:6] + bad[1:] + good[6:]
    for k in range(2):
        write_records(tmp_path / f"train-{k:05d}-of-00002", mixed[k::2])
    return str(tmp_path / "train-*")


@pytest.mark.parametrize("cache", [None, "decoded"])
def test_the_skipped_record_counter_still_counts(tmp_path, cache):
    pattern = _bad_records(tmp_path)
    counter = pipeline.SkippedRecordCounter()
    ds = pipeline.imagenet_dataset(pattern, True, 16, 4, dtype="uint8", num_classes=10, skip_counter=counter,
                                   repeat=False, drop_remainder=False, cache=cache, seed=2)
    assert sorted(_epoch(ds)[1]) == list(range(8))
    assert counter.result() == 3
    assert sorted(_epoch(ds)[1]) == list(range(8))
    assert counter.result() == (3 if cache == "decoded" else 6)  # the cache replays the good images only


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "uint8", "normalize": True}, "dtype='uint8'"),
    ({"dtype": "int16", "normalize": False}, "dtype='int16'"),
])
def test_bad_dtype_normalize_combinations(own_records, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipeline.imagenet_dataset(own_records[0], True, 8, 2, **kwargs)
