"""Benchmarks tfscale's training input pipeline against a naive pipeline and the JPEG-decode floor.

It builds TFRecords of real photographs at ImageNet-like sizes (the photos shipped by scikit-learn and
scikit-image, randomly cropped and rescaled to 500x375 or 375x500, re-encoded as JPEG quality 90), then measures
images per second, in one run and with the same thread pool, for:

(a) tfscale: `imagenet_dataset(..., is_training=True, dtype="uint8")`, the TPU-reference recipe of Ying et al.,
    arXiv:1811.06992 (`extract_jpeg_shape` -> `sample_distorted_bounding_box` -> fused `decode_and_crop_jpeg` ->
    resize -> round to uint8 -> flip -> batch), with and without the skipped-record counter. The normalisation
    runs in the model, on the accelerator (what scripts/train.py does); (a') is the same pipeline with the older
    host-side float32 normalisation (`dtype="float32"`), for comparison;
(b) naive: full `tf.io.decode_jpeg`, then the same random crop (slice), resize, flip, batch, normalise;
(c) floor: `tf.io.decode_jpeg` alone on the same records (read + parse + decode, nothing else).

A fourth variant, (b') the naive pipeline with tfscale's per-image normalisation, separates the gain of the fused
decode-and-crop from the gain of the cheaper normalisation.

Every variant streams the records forever (as a training input does). Each of `--reps` runs opens a fresh
iterator, skips `--warmup_batches` batches (thread start-up, autotuning, shuffle-buffer fill) and times the next
`--timed_batches`; runs are interleaved (a, b, c, a, b, c, ...) so machine noise hits all variants alike. Two figures are reported: images per wall-clock second, and images per CPU second of this process
(all its threads; robust when other jobs share the cores), also given as CPU milliseconds per image. The medians,
the ratios (a)/(b) (target >= 1.6) and (a)/(c) (target >= 0.9, issue 16) are printed as a table and written to
`--output` as JSON with the 1-minute load average before and after the run.

Example:
  python scripts/benchmark_input.py --num_records=304 --reps=7 --output=/tmp/benchmark_input.json
"""

import json
import os
import platform
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from tfscale.data import IMAGENET_MEAN_RGB
from tfscale.data import IMAGENET_STDDEV_RGB
from tfscale.data import SkippedRecordCounter
from tfscale.data import imagenet_dataset
from tfscale.data import normalize_images
from tfscale.data import records


def define_flags():
    """Defines the command-line flags of this script."""
    flags.DEFINE_integer("num_records", 304, "Number of photographs (records) to build.")
    flags.DEFINE_integer("num_shards", 8, "Number of TFRecord shards.")
    flags.DEFINE_integer("image_size", 224, "Output size of the training crop, pixels.")
    flags.DEFINE_integer("batch_size", 64, "Batch size.")
    flags.DEFINE_integer("reps", 7, "Timed runs per variant (the median is reported).")
    flags.DEFINE_integer("timed_batches", 10, "Batches timed per run, after --warmup_batches untimed ones.")
    flags.DEFINE_integer("warmup_batches", 3, "Untimed batches at the start of each run (threads, autotune).")
    flags.DEFINE_integer("threads", None, "Private thread pool size of every pipeline (default: CPU count).")
    flags.DEFINE_string("records_dir", None, "Where to build the records (default: a temporary directory).")
    flags.DEFINE_string("output", "benchmark_input.json", "JSON output path.")
    flags.DEFINE_integer("seed", 0, "Seed of the photo crops.")


def _photos():
    """The real photographs of scikit-learn and scikit-image, uint8 RGB."""
    from sklearn.datasets import load_sample_images
    from skimage import data as skdata

    photos = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "colorwheel", "retina", "cat"):
        if hasattr(skdata, name):
            try:
                img = getattr(skdata, name)()
            except Exception:  # noqa: BLE001 - some skimage images need a download; skip those
                continue
            if img.ndim == 3 and img.shape[2] >= 3:
                photos.append(np.ascontiguousarray(img[..., :3]))
    for name in ("camera", "coins", "moon"):
        try:
            grey = getattr(skdata, name)()
        except Exception:  # noqa: BLE001
            continue
        photos.append(np.repeat(grey[..., None], 3, axis=2))
    return photos


def build_records(output_dir, num_records, num_shards, seed):
    """Writes `num_records` JPEG records (about 500x375) of random crops of the real photos.

    Returns:
      dict, the metadata of the written split ("train").
    """
    rng = np.random.RandomState(seed)
    photos = _photos()

    def examples():
        for i in range(num_records):
            img = photos[i % len(photos)]
            h, w = img.shape[:2]
            portrait = rng.rand() < 0.25
            out_h, out_w = (500, 375) if portrait else (375, 500)
            # A random crop of 60-100 % of the photo with the output's aspect ratio, rescaled to 500x375.
            scale = rng.uniform(0.6, 1.0)
            ch = int(min(h, w * out_h / out_w) * scale)
            cw = int(ch * out_w / out_h)
            y, x = rng.randint(0, h - ch + 1), rng.randint(0, w - cw + 1)
            crop = tf.image.resize(img[y : y + ch, x : x + cw], [out_h, out_w], antialias=True)
            crop = tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)
            encoded = tf.io.encode_jpeg(crop, quality=90).numpy()
            yield records.make_example(
                encoded, 1 + i % 10, out_h, out_w, 3, synset=f"photo{i % len(photos)}", filename=f"p{i}.JPEG"
            ).SerializeToString()

    return records.write_sharded_records(
        examples(), output_dir, "train", num_shards, num_examples=num_records, progress=False
    )


def _options(threads):
    options = tf.data.Options()
    options.deterministic = False
    options.threading.private_threadpool_size = threads
    return options


def _raw_records(files):
    """The records of `files`, repeated forever (every variant streams, like a training input)."""
    return tf.data.Dataset.from_tensor_slices(files).repeat().interleave(
        tf.data.TFRecordDataset, cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )


def _parse(serialized):
    f = tf.io.parse_single_example(
        serialized,
        {
            records.ENCODED_KEY: tf.io.FixedLenFeature([], tf.string),
            records.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
        },
    )
    return f[records.ENCODED_KEY], tf.cast(f[records.LABEL_KEY] - 1, tf.int32)


def naive_pipeline(files, image_size, batch_size, threads, fast_normalize=False):
    """(b): full decode, then the TPU crop sampled on the decoded shape, slice, resize, flip, batch, normalise.

    The naive normalisation is the textbook `(x / 255 - mean) / std` on the batch; with `fast_normalize` the
    image is normalised like tfscale does it (per image, same-shape constants), which isolates the gain of the
    fused decode-and-crop alone.
    """

    def preprocess(serialized):
        data, label = _parse(serialized)
        image = tf.io.decode_jpeg(data, channels=3)
        bbox = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), bbox, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(image, [image_size, image_size])
        image = tf.image.random_flip_left_right(image)
        if fast_normalize:
            image = normalize_images(image)
        return image, label

    mean = tf.constant(IMAGENET_MEAN_RGB)
    std = tf.constant(IMAGENET_STDDEV_RGB)
    ds = _raw_records(files).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.batch(batch_size)
    if not fast_normalize:
        ds = ds.map(lambda x, y: ((x / 255.0 - mean) / std, y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.with_options(_options(threads)).prefetch(tf.data.AUTOTUNE)


def floor_pipeline(files, batch_size, threads):
    """(c): read, parse and `tf.io.decode_jpeg` each record; only the decoded shape leaves the map."""

    def decode(serialized):
        data, label = _parse(serialized)
        return tf.shape(tf.io.decode_jpeg(data, channels=3)), label

    ds = _raw_records(files).map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return ds.batch(batch_size).with_options(_options(threads)).prefetch(tf.data.AUTOTUNE)


def _time_run(ds, warmup_batches, timed_batches):
    """One run on a fresh iterator: (images, wall seconds, CPU seconds of this process, all its threads).

    The first `warmup_batches` batches are not timed (thread start-up, autotuning, shuffle-buffer fill); the next
    `timed_batches` are. Only this iterator is alive while it is timed, so the CPU time is its own.
    """
    iterator = iter(ds)
    for _ in range(warmup_batches):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(timed_batches):
        _, labels = next(iterator)
        n += int(labels.shape[0])
    result = n, time.perf_counter() - wall, time.process_time() - cpu
    del iterator
    return result


def run(flags_obj):
    """Builds the records and times the variants.

    Args:
      flags_obj: the parsed `absl.flags.FLAGS`.

    Returns:
      dict with per-variant medians (images/s), all rep figures, the ratios, the targets and the configuration.

    Raises:
      ValueError: for non-positive `--num_records`, `--reps` or `--batch_size`.
    """
    for name in ("num_records", "reps", "batch_size", "num_shards", "image_size", "timed_batches"):
        if getattr(flags_obj, name) <= 0:
            raise ValueError(f"Flag `--{name}` must be > 0. Received: --{name}={getattr(flags_obj, name)}")
    threads = flags_obj.threads or os.cpu_count() or 1
    records_dir = flags_obj.records_dir or tempfile.mkdtemp(prefix="tfscale_bench_")
    info = records.read_metadata(records_dir, "train")
    if info is None or info["num_examples"] != flags_obj.num_records:
        info = build_records(records_dir, flags_obj.num_records, flags_obj.num_shards, flags_obj.seed)
    files = sorted(tf.io.gfile.glob(info["file_pattern"]))
    size, batch = flags_obj.image_size, flags_obj.batch_size
    counter = SkippedRecordCounter()
    load_before = os.getloadavg()[0]
    variants = {
        "tfscale (counted skips)": imagenet_dataset(
            files, True, size, batch, skip_counter=counter, private_threadpool_size=threads,
            shuffle_buffer_size=flags_obj.num_records, dtype="uint8",
        ),
        "tfscale": imagenet_dataset(
            files, True, size, batch, private_threadpool_size=threads,
            shuffle_buffer_size=flags_obj.num_records, dtype="uint8",
        ),
        "tfscale, float32 host-normalised": imagenet_dataset(
            files, True, size, batch, private_threadpool_size=threads,
            shuffle_buffer_size=flags_obj.num_records, dtype="float32",
        ),
        "naive": naive_pipeline(files, size, batch, threads),
        "naive + tfscale normalisation": naive_pipeline(files, size, batch, threads, fast_normalize=True),
        "decode_jpeg floor": floor_pipeline(files, batch, threads),
    }
    rates = {k: [] for k in variants}
    cpu_rates = {k: [] for k in variants}
    for _ in range(flags_obj.reps):
        for name, ds in variants.items():
            n, seconds, cpu_seconds = _time_run(ds, flags_obj.warmup_batches, flags_obj.timed_batches)
            if n != flags_obj.timed_batches * batch:
                raise RuntimeError(f"{name} produced {n} images; expected {flags_obj.timed_batches * batch}.")
            rates[name].append(n / seconds)
            cpu_rates[name].append(n / cpu_seconds)
    medians = {k: float(np.median(v)) for k, v in rates.items()}
    cpu_medians = {k: float(np.median(v)) for k, v in cpu_rates.items()}

    def ratios_of(m):
        return {
            "tfscale/naive": m["tfscale"] / m["naive"],
            "tfscale/floor": m["tfscale"] / m["decode_jpeg floor"],
            "tfscale/naive_fast_norm": m["tfscale"] / m["naive + tfscale normalisation"],
            "tfscale (counted)/naive": m["tfscale (counted skips)"] / m["naive"],
            "tfscale (counted)/floor": m["tfscale (counted skips)"] / m["decode_jpeg floor"],
            "tfscale float32/floor": m["tfscale, float32 host-normalised"] / m["decode_jpeg floor"],
        }

    ratios, cpu_ratios = ratios_of(medians), ratios_of(cpu_medians)
    result = {
        "images_per_second_median": medians,
        "images_per_second_reps": rates,
        "images_per_cpu_second_median": cpu_medians,
        "images_per_cpu_second_reps": cpu_rates,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "targets": {"tfscale/naive": 1.6, "tfscale/floor": 0.9},
        "cpu_ms_per_image_median": {k: 1000.0 / v for k, v in cpu_medians.items()},
        "skipped_records": counter.result(),
        "config": {
            "num_records": flags_obj.num_records,
            "num_shards": flags_obj.num_shards,
            "image_size": size,
            "batch_size": batch,
            "reps": flags_obj.reps,
            "timed_batches": flags_obj.timed_batches,
            "warmup_batches": flags_obj.warmup_batches,
            "threads": threads,
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "load_average_1min_before": load_before,
            "tensorflow": tf.__version__,
            "machine": platform.platform(),
        },
    }
    width = max(len(k) for k in medians)
    lines = [
        f"{'pipeline'.ljust(width)} | images/s | vs naive | vs floor | images/CPU-s | vs naive | vs floor | CPU ms/image",
        f"{'-' * width} | -------- | -------- | -------- | ------------ | -------- | -------- | ------------",
    ]
    for name in medians:
        w, c = medians[name], cpu_medians[name]
        lines.append(
            f"{name.ljust(width)} | {w:8,.0f} | {w / medians['naive']:8.2f} | {w / medians['decode_jpeg floor']:8.2f} |"
            f" {c:12,.0f} | {c / cpu_medians['naive']:8.2f} | {c / cpu_medians['decode_jpeg floor']:8.2f} |"
            f" {1000.0 / c:12.3f}"
        )
    lines.append(
        f"targets (a)/(b) >= 1.6: wall {ratios['tfscale/naive']:.2f}, CPU {cpu_ratios['tfscale/naive']:.2f}; "
        f"(a)/(c) >= 0.9: wall {ratios['tfscale/floor']:.2f}, CPU {cpu_ratios['tfscale/floor']:.2f} "
        f"(medians of {flags_obj.reps} interleaved runs of {flags_obj.timed_batches} batches; 1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores)"
    )
    result["table"] = "\n".join(lines)
    with open(flags_obj.output, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def main(_):
    result = run(flags.FLAGS)
    print(result["table"])
    print(f"JSON written to {flags.FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
