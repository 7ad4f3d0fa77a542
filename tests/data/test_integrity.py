"""Tests of tfscale.data.integrity through imagenet_dataset (issue 18): failing fast on unusable data instead of
hanging, skip reasons, implausible JPEG headers, and damaged record files named with exact counts."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from datahelpers import jpeg
from datahelpers import smooth_images
from datahelpers import write_records
from tfscale.data import integrity
from tfscale.data import pipeline
from tfscale.data import records


def _good_examples(n, first_label=1, size=24):
    imgs = smooth_images(n, size, size)
    return [records.make_example(jpeg(imgs[i]), first_label + i, size, size, 3).SerializeToString()
            for i in range(n)]


def _tfds_example(image_bytes, label):
    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    })).SerializeToString()


@pytest.mark.timeout(120)
def test_all_png_training_stream_fails_fast_instead_of_hanging(tmp_path):
    """Item 1: every record holds a PNG where a JPEG is expected; the repeated training stream used to spin
    forever. Now the first `fail_fast_records` records give one error naming the pattern, reason and keys."""
    png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
    write_records(tmp_path / "train-00000-of-00001",
                  [records.make_example(png, 1, 8, 8, 3).SerializeToString() for _ in range(50)])
    pattern = str(tmp_path / "train-*")
    counter = pipeline.SkippedRecordCounter()
    ds = pipeline.imagenet_dataset(pattern, True, 8, 4, skip_counter=counter, fail_fast_records=200)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        next(iter(ds))
    message = str(info.value)
    assert integrity.FAIL_FAST_MARKER in message
    assert "image bytes are not a JPEG" in message
    assert pattern in message and "image_key=image/encoded," in message and "label_offset=1" in message
    assert integrity.explain_input_error(info.value).endswith("label_offset=0.")


@pytest.mark.timeout(120)
def test_tfds_records_with_tpu_keys_fail_fast_and_tfds_keys_work(tmp_path):
    """Item 1: TFDS-keyed records read with the default (TPU) keys fail fast, naming the missing key; with the
    TFDS preset keys they read."""
    imgs = smooth_images(6, 16, 16)
    write_records(tmp_path / "train-00000-of-00001", [_tfds_example(jpeg(imgs[i]), i) for i in range(6)])
    pattern = str(tmp_path / "train-*")
    ds = pipeline.imagenet_dataset(pattern, True, 16, 2, label_offset=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="missing image key"):
        next(iter(ds))
    image_key, label_key, offset = integrity.KEY_PRESETS["tfds"]
    ds = pipeline.imagenet_dataset(pattern, False, 16, 6, image_key=image_key, label_key=label_key,
                                   label_offset=offset)
    assert sorted(next(iter(ds))[1].numpy()) == list(range(6))


@pytest.mark.timeout(120)
def test_a_whole_pass_of_undecodable_jpegs_fails_after_one_pass(tmp_path):
    """Records that pass every header check but break the decoder are dropped by ignore_errors(); the end-of-pass
    sentinel still reaches the check, so a stream shorter than `fail_fast_records` fails after one pass."""
    full = jpeg(smooth_images(1, 24, 24)[0])
    bad = records.make_example(full[:200], 1, 24, 24, 3).SerializeToString()  # truncated inside the scan data
    write_records(tmp_path / "train-00000-of-00001", [bad] * 20)
    ds = pipeline.imagenet_dataset(str(tmp_path / "train-*"), True, 24, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="a whole pass over the files.*corrupt record"):
        next(iter(ds))


def test_skips_are_counted_by_reason_and_some_good_records_do_not_fail(tmp_path):
    png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
    examples = _good_examples(3) + [records.make_example(png, 1, 8, 8, 3).SerializeToString()] * 4
    write_records(tmp_path / "train-00000-of-00001", examples)
    counter = pipeline.SkippedRecordCounter()
    ds = pipeline.imagenet_dataset(str(tmp_path / "train-*"), False, 16, 8, skip_counter=counter,
                                   fail_fast_records=2)
    assert sorted(next(iter(ds))[1].numpy()) == [0, 1, 2]
    assert counter.result() == 4
    assert counter.result_by_reason() == {"image bytes are not a JPEG": 4}


def _with_header_size(jpeg_bytes, height, width):
    """Rewrites the SOF0 frame header of a baseline JPEG to claim `height` x `width`."""
    data = bytearray(jpeg_bytes)
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def test_absurd_image_header_is_skipped_and_counted(tmp_path):
    """Smaller cut: a header claiming 9000x9000 over 28x28 data is skipped and counted, not trained on."""
    small = jpeg(np.full((28, 28, 3), 128, np.uint8))
    absurd = _with_header_size(small, 9000, 9000)
    assert tf.io.extract_jpeg_shape(absurd).numpy().tolist()[:2] == [9000, 9000]
    write_records(tmp_path / "train-00000-of-00001",
                  _good_examples(2) + [records.make_example(absurd, 3, 28, 28, 3).SerializeToString()])
    counter = pipeline.SkippedRecordCounter()
    ds = pipeline.imagenet_dataset(str(tmp_path / "train-*"), False, 28, 8, skip_counter=counter)
    assert sorted(next(iter(ds))[1].numpy()) == [0, 1]
    assert counter.result_by_reason() == {"image header larger than its data can hold": 1}


def test_truncated_record_file_is_named_and_the_totals_add_up(tmp_path):
    """Item 5: a truncated shard used to lose the rest of the stream silently. Now verify_record_files names it
    with the records readable before the damage, the pipeline reads exactly those plus every other file, and
    readable + lost = written."""
    examples = _good_examples(40)
    write_records(tmp_path / "train-00000-of-00002", examples[:20])
    write_records(tmp_path / "train-00001-of-00002", examples[20:])
    damaged = tmp_path / "train-00000-of-00002"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    reports = integrity.verify_record_files(str(tmp_path / "train-*"))
    assert [r.problem is None for r in reports] == [False, True]
    readable = reports[0].num_records
    assert 0 < readable < 20 and "truncated" in reports[0].problem
    assert integrity.describe_damage(reports)[0].startswith(str(damaged))
    counter = pipeline.SkippedRecordCounter()
    ds = pipeline.imagenet_dataset(str(tmp_path / "train-*"), False, 16, 64, skip_counter=counter)
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert sorted(labels) == list(range(readable)) + list(range(20, 40))
    assert counter.result() == 0  # lost records are not skipped records: they are reported by file
    assert len(labels) + (20 - readable) == 40


def test_gzip_compressed_file_is_named(tmp_path):
    write_records(tmp_path / "plain", _good_examples(2))
    (tmp_path / "train-00000-of-00001").write_bytes(gzip.compress((tmp_path / "plain").read_bytes()))
    (report,) = integrity.verify_record_files(str(tmp_path / "train-*"))
    assert report.num_records == 0 and "GZIP-compressed" in report.problem
    assert integrity.verify_record_file(str(tmp_path / "plain")) == integrity.RecordFileReport(
        str(tmp_path / "plain"), 2, None)
