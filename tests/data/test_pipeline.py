"""Tests of tfscale.data.imagenet_dataset: shapes/dtypes/ranges, exactly-once sharding with 1, 2 and 4 input
pipelines, counted skipping of bad records, the TFDS label offset, distribution, Keras logging, tf.data service."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from datahelpers import jpeg
from datahelpers import smooth_images
from datahelpers import write_records
from tfscale.data import pipeline
from tfscale.data import records


def _labels(ds):
    return np.concatenate([y.numpy() for _, y in ds])


def test_eval_shapes_dtypes_ranges_and_zero_based_labels(unique_label_records):
    pattern, _ = unique_label_records
    ds = pipeline.imagenet_dataset(pattern, False, 16, 5)
    batches = list(ds)
    assert [int(y.shape[0]) for _, y in batches] == [5, 5, 5, 5, 4]  # last partial batch kept
    x, y = batches[0]
    assert x.dtype == tf.float32 and x.shape[1:] == (16, 16, 3) and y.dtype == tf.int32
    # Stored labels are 1..24 (1-based); the pipeline yields 0..23.
    assert sorted(_labels(ds)) == list(range(24))
    lo, hi = -0.485 / 0.229, (1 - 0.406) / 0.225
    for x, _ in batches:
        assert lo - 1e-4 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= hi + 1e-4
    unit = pipeline.imagenet_dataset(pattern, False, 16, 24, mean=(0, 0, 0), stddev=(1, 1, 1), dtype="bfloat16")
    x, _ = next(iter(unit))
    assert x.dtype == tf.bfloat16 and 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0


def test_eval_pixels_match_the_source_images(unique_label_records):
    pattern, images = unique_label_records
    ds = pipeline.imagenet_dataset(pattern, False, 32, 24, central_fraction=1.0, mean=(0, 0, 0), stddev=(1, 1, 1))
    x, y = next(iter(ds))
    for img, label in zip(x.numpy(), y.numpy()):
        src = images[label][4:36, :, :] / 255.0  # the centred 32x32 square of a 40x32 image
        assert np.abs(img - src).mean() < 2.0 / 255


def test_eval_is_deterministic(unique_label_records):
    pattern, _ = unique_label_records
    runs = [[(x.numpy(), y.numpy()) for x, y in pipeline.imagenet_dataset(pattern, False, 16, 7)] for _ in range(2)]
    for (xa, ya), (xb, yb) in zip(*runs):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


def test_training_repeats_with_full_batches(unique_label_records):
    pattern, _ = unique_label_records
    ds = pipeline.imagenet_dataset(pattern, True, 16, 5, shuffle_buffer_size=24, seed=1)
    labels = []
    for x, y in ds.take(20):  # 100 images from 24 records: the data set repeats
        assert x.shape == (5, 16, 16, 3)
        labels.extend(y.numpy())
    counts = np.bincount(labels, minlength=24)
    assert len(counts) == 24 and counts.min() >= 1  # every record came back, some several times


@pytest.mark.parametrize("num_pipelines", [1, 2, 4])
def test_every_record_read_exactly_once(unique_label_records, num_pipelines):
    pattern, _ = unique_label_records
    seen = []
    for pid in range(num_pipelines):
        ctx = tf.distribute.InputContext(num_input_pipelines=num_pipelines, input_pipeline_id=pid)
        seen.append(_labels(pipeline.imagenet_dataset(pattern, False, 8, 4, input_context=ctx)))
    assert sorted(np.concatenate(seen)) == list(range(24))
    if num_pipelines > 1:
        assert all(0 < len(s) < 24 for s in seen)


@pytest.mark.parametrize("is_training", [False, True])
def test_fewer_files_than_pipelines_falls_back_to_record_sharding(tmp_path, is_training):
    info = records.convert_arrays(smooth_images(10, 8, 8), np.arange(10), str(tmp_path), "train", 2, progress=False)
    seen = []
    for pid in range(4):
        ctx = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=pid)
        with pytest.warns(UserWarning, match="keeps 1/4 of its records"):
            ds = pipeline.imagenet_dataset(
                info["file_pattern"], is_training, 8, 1, input_context=ctx, repeat=False, seed=pid
            )
        seen.append(_labels(ds))
    assert sorted(np.concatenate(seen)) == list(range(10))


@pytest.fixture(scope="module")
def records_with_bad_ones(tmp_path_factory):
    """12 good records (labels 1..12) and 6 bad ones of every kind, in 3 files."""
    d = tmp_path_factory.mktemp("bad")
    imgs = smooth_images(13, 24, 24)
    good = [records.make_example(jpeg(imgs[i]), i + 1, 24, 24, 3).SerializeToString() for i in range(12)]
    full = jpeg(imgs[12])
    big = jpeg(smooth_images(1, 64, 64)[0])
    bad = [
        records.make_example(full[: len(full) // 2], 13, 24, 24, 3).SerializeToString(),  # truncated JPEG
        records.make_example(b"\xff\xd8garbage" * 20, 14, 24, 24, 3).SerializeToString(),  # corrupt JPEG
        tf.train.Example(features=tf.train.Features(feature={  # missing image/encoded
            records.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[15]))
        })).SerializeToString(),
        b"this is not a tf.train.Example",  # unparsable record
        records.make_example(big, 16, 64, 64, 3).SerializeToString(),  # above max_pixels=1000 (64*64=4096)
        records.make_example(jpeg(imgs[0]), 99, 24, 24, 3).SerializeToString(),  # label out of range
    ]
    mixed = good + bad
    order = np.random.RandomState(0).permutation(len(mixed))
    mixed = [mixed[i] for i in order]
    for k in range(3):
        write_records(d / f"train-{k:05d}-of-00003", mixed[k::3])
    return str(d / "train-*-of-*")


@pytest.mark.parametrize("is_training", [False, True])
def test_bad_records_are_skipped_and_counted_exactly(records_with_bad_ones, is_training):
    counter = pipeline.SkippedRecordCounter()
    ds = pipeline.imagenet_dataset(
        records_with_bad_ones, is_training, 16, 4, num_classes=20, max_pixels=1000, skip_counter=counter,
        repeat=False, drop_remainder=False,
    )
    for epoch in (1, 2):
        labels = _labels(ds)
        assert sorted(labels) == list(range(12))  # nothing good is lost
        assert counter.result() == 6 * epoch
    counter.reset()
    assert counter.result() == 0


def test_bad_records_are_skipped_without_a_counter(records_with_bad_ones):
    ds = pipeline.imagenet_dataset(records_with_bad_ones, False, 16, 4, num_classes=20, max_pixels=1000)
    assert sorted(_labels(ds)) == list(range(12))


def test_tfds_records_with_label_offset_zero(tmp_path):
    imgs = smooth_images(6, 20, 20)
    examples = [
        tf.train.Example(features=tf.train.Features(feature={
            records.TFDS_IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg(imgs[i])])),
            records.TFDS_LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),  # 0-based
            records.TFDS_FILENAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"f.JPEG"])),
        })).SerializeToString()
        for i in range(6)
    ]
    write_records(tmp_path / "imagenet2012-train.tfrecord-00000-of-00001", examples)
    ds = pipeline.imagenet_dataset(
        str(tmp_path / "imagenet2012-train.tfrecord-*"), False, 16, 6, label_offset=0,
        image_key=records.TFDS_IMAGE_KEY, label_key=records.TFDS_LABEL_KEY,
    )
    assert sorted(_labels(ds)) == list(range(6))
    # With the ImageNet default offset the label-0 record would be -1: it is skipped and counted.
    counter = pipeline.SkippedRecordCounter()
    wrong = pipeline.imagenet_dataset(
        str(tmp_path / "*"), False, 16, 6, image_key="image", label_key="label", skip_counter=counter
    )
    assert sorted(_labels(wrong)) == list(range(5)) and counter.result() == 1


def test_distribute_datasets_from_function_with_a_shared_counter(records_with_bad_ones, cpu_devices):
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:4], cross_device_ops=tf.distribute.ReductionToOneDevice())
    counter = pipeline.SkippedRecordCounter()
    global_batch = 8
    contexts = []

    def dataset_fn(ctx):
        contexts.append(ctx)
        return pipeline.imagenet_dataset(
            records_with_bad_ones, False, 16, ctx.get_per_replica_batch_size(global_batch), input_context=ctx,
            num_classes=20, max_pixels=1000, skip_counter=counter,
        )

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    labels = []
    for _, y in dist:
        for v in strategy.experimental_local_results(y):
            assert v.shape[0] <= 2
            labels.extend(v.numpy())
    assert sorted(labels) == list(range(12))
    assert counter.result() == 6
    with strategy.scope(), pytest.raises(RuntimeError, match="outside `strategy.scope"):
        pipeline.SkippedRecordCounter()


def test_keras_callback_logs_skipped_records_each_epoch(records_with_bad_ones):
    counter = pipeline.SkippedRecordCounter()
    ds = pipeline.imagenet_dataset(
        records_with_bad_ones, False, 8, 4, num_classes=20, max_pixels=1000, skip_counter=counter, repeat=True
    )
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(20)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    lines = []
    logger = pipeline.SkippedRecordsLogger(counter, print_fn=lines.append)
    hist = model.fit(ds, epochs=2, steps_per_epoch=3, callbacks=[logger], verbose=0)
    totals = hist.history["skipped_records"]
    assert totals[0] >= 1 and totals[1] >= totals[0]
    assert hist.history["skipped_records_epoch"][0] == totals[0]
    assert totals[-1] <= counter.result()  # the pipeline may have read ahead since the last log
    assert lines and "bad input records" in lines[0]
    with pytest.raises(TypeError, match="SkippedRecordCounter"):
        pipeline.SkippedRecordsLogger(3)


def test_data_service_two_workers_read_every_element_once(unique_label_records):
    from tfscale.data.service import LocalDataService

    pattern, _ = unique_label_records
    with LocalDataService(num_workers=2) as service:
        assert service.address.startswith("grpc://")
        ds = pipeline.imagenet_dataset(
            pattern, False, 8, 1, data_service_address=service.address, data_service_job_name="exactly_once"
        )
        labels = _labels(ds)
        assert sorted(labels) == list(range(24))


def test_data_service_counts_skipped_records_on_the_client(records_with_bad_ones):
    from tfscale.data.service import LocalDataService

    counter = pipeline.SkippedRecordCounter()
    with LocalDataService(num_workers=2) as service:
        ds = pipeline.imagenet_dataset(
            records_with_bad_ones, True, 8, 2, num_classes=20, max_pixels=1000, skip_counter=counter,
            data_service_address=service.address, data_service_job_name="counted", shuffle_buffer_size=8,
        )
        labels = [y.numpy() for _, y in ds.take(30)]  # 60 images: more than 3 passes over the 12 good records
    assert set(np.concatenate(labels)) == set(range(12))
    assert counter.result() >= 6  # every pass over the files meets the 6 bad records


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image_size": 0}, ValueError, "image_size=0"),
        ({"batch_size": -2}, ValueError, "batch_size=-2"),
        ({"train_crop": "random"}, ValueError, "train_crop='random'"),
        ({"area_range": (0.9, 0.1)}, ValueError, "area_range"),
        ({"cache": "disk"}, ValueError, "cache='disk'"),
        ({"dtype": "int8"}, ValueError, "dtype='int8'"),
        ({"mean": (1, 2)}, ValueError, "mean"),
        ({"num_classes": 0}, ValueError, "num_classes=0"),
        ({"skip_counter": 5}, TypeError, "skip_counter=5"),
        ({"data_service_address": "grpc://nohost"}, ValueError, "grpc://host:port"),
    ],
)
def test_bad_arguments(unique_label_records, kwargs, error, match):
    args = {"file_pattern": unique_label_records[0], "is_training": True, "image_size": 8, "batch_size": 2}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pipeline.imagenet_dataset(**args)


def test_no_matching_files_names_the_pattern(tmp_path):
    with pytest.raises(ValueError, match="empty-dir"):
        pipeline.imagenet_dataset(os.path.join(str(tmp_path), "empty-dir", "*"), True, 8, 2)


@pytest.mark.parametrize("cache", ["raw", "decoded"])
def test_cache_gives_the_same_epochs(unique_label_records, cache):
    pattern, _ = unique_label_records
    reference = list(pipeline.imagenet_dataset(pattern, False, 8, 24))[0]
    ds = pipeline.imagenet_dataset(pattern, False, 8, 24, cache=cache)
    for _ in range(2):
        x, y = next(iter(ds))
        np.testing.assert_array_equal(y.numpy(), reference[1].numpy())
        np.testing.assert_array_equal(x.numpy(), reference[0].numpy())
    repeated = pipeline.imagenet_dataset(pattern, False, 8, 16, cache=cache, repeat=True)
    assert sorted(np.concatenate([y.numpy() for _, y in repeated.take(3)])) == sorted(list(range(24)) * 2)
    # Training with cache="decoded" keeps the whole decoded images (tests/data/test_fast_pipeline.py); it lives on
    # this host, so it cannot be combined with the tf.data service.
    with pytest.raises(ValueError, match="cannot be combined with the tf.data service"):
        pipeline.imagenet_dataset(pattern, True, 8, 2, cache="decoded", data_service_address="grpc://localhost:5050")


def test_failures_at_the_very_end_of_a_finite_stream_are_counted(tmp_path):
    imgs = smooth_images(3, 16, 16)
    good = [records.make_example(jpeg(imgs[i]), i + 1, 16, 16, 3).SerializeToString() for i in range(3)]
    write_records(tmp_path / "train-00000-of-00001", [b"bad first"] + good + [b"bad", b"worse"])
    counter = pipeline.SkippedRecordCounter()
    ds = pipeline.imagenet_dataset(str(tmp_path / "train-*"), False, 8, 2, skip_counter=counter)
    assert sorted(_labels(ds)) == [0, 1, 2]
    assert counter.result() == 3


def test_fit_under_mirrored_strategy_with_counter_and_logger(records_with_bad_ones, cpu_devices):
    """The wiring scripts/train.py uses: distribute_datasets_from_function + fit + SkippedRecordsLogger."""
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:4], cross_device_ops=tf.distribute.ReductionToOneDevice())
    counter = pipeline.SkippedRecordCounter()  # outside strategy.scope()
    global_batch = 8

    def dataset_fn(ctx):
        return pipeline.imagenet_dataset(
            records_with_bad_ones, True, 8, ctx.get_per_replica_batch_size(global_batch), input_context=ctx,
            num_classes=20, max_pixels=1000, skip_counter=counter, shuffle_buffer_size=8,
        )

    train_ds = strategy.distribute_datasets_from_function(dataset_fn)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(20)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = model.fit(train_ds, epochs=2, steps_per_epoch=3, verbose=0,
                     callbacks=[pipeline.SkippedRecordsLogger(counter, verbose=0)])
    logged = hist.history["skipped_records"]
    # The pipeline reads ahead (shuffle, prefetch to devices), so the counter may have moved on since the log.
    assert 1 <= logged[0] <= logged[1] <= counter.result()


def test_evaluation_pipelines_run_without_autotuning(unique_label_records):
    """Evaluation pipelines turn tf.data autotuning off (a finished iterator with autotuning on was destroyed only
    when its autotuning thread next woke up: 29-78 s per validation in the default job); training keeps it.
    Whether that removes the default job's validation stalls is still to be measured (docs/benchmarks.md)."""
    pattern, _ = unique_label_records
    assert pipeline.imagenet_dataset(pattern, True, 16, 5).options().autotune.enabled is True
    assert pipeline.imagenet_dataset(pattern, False, 16, 5).options().autotune.enabled is False
    assert pipeline.imagenet_dataset(pattern, False, 16, 5, autotune=True).options().autotune.enabled is True
