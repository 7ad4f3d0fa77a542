"""`imagenet_dataset`: the host-side ImageNet TFRecord input pipeline, with counted skipping of bad records.

The recipe follows the TPU reference ResNet input pipeline described by Ying et al., "Image Classification at
Supercomputer Scale", arXiv:1811.06992:

    sorted files ─▶ shard by InputContext (each pipeline its own files) ─▶ shuffle files ─▶ parallel interleave
    of TFRecordDataset ─▶ [cache raw] ─▶ repeat (training) ─▶ shuffle buffer (training) ─▶ parse + fused
    decode-and-crop + resize + flip + per-channel normalisation in the output dtype, in parallel ─▶ drop and
    count bad records ─▶ [cache decoded, evaluation only] ─▶ batch (drop_remainder for training) ─▶ prefetch

with AUTOTUNE parallelism, a private thread pool and determinism off for training, on for evaluation
(`tf.data.Options`).

Bad records are skipped, never fatal: a record that cannot be parsed or lacks a key, a corrupt or truncated JPEG,
an image above `max_pixels` (decompression bomb) or a label out of `[0, num_classes)`. With a `skip_counter`, the
records are numbered (`enumerate`) before the parallel decode, which keeps their order (`deterministic=True` for
that one map only); `ignore_errors()` drops the failures and a `scan` counts the gaps in the numbering into the
`SkippedRecordCounter` (a host variable). A sentinel record closes a finite stream so trailing failures count
too. `SkippedRecordsLogger` (a Keras callback) reports the count at the end of each epoch. The count is exact and
nothing else is lost. With the tf.data service the gaps travel inside the batches and are counted on the
consuming host. Without a counter, bad records are dropped by a plain `ignore_errors()`.
"""

import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfscale.data import integrity
from tfscale.data import jpeg_messages
from tfscale.data import preprocessing
from tfscale.data import records

#: Default pixel limit (height * width) above which an image is skipped as a decompression bomb; the value of
#: Pillow's `Image.MAX_IMAGE_PIXELS` (about 89.5 megapixels; the largest ImageNet image has ~ 12 megapixels).
DEFAULT_MAX_PIXELS = 89_478_485
#: Marks the end of a finite record stream for the skip counter (never a valid serialized tf.train.Example).
_SENTINEL = b"\x00tfscale: end of the record stream\x00"
#: Read buffer of each open `TFRecordDataset`, in bytes (the TPU reference uses 8 MiB, for GCS).
DEFAULT_READ_BUFFER_BYTES = 1024 * 1024


class SkippedRecordCounter:
    """Counts the records an input pipeline skipped (bad JPEG, missing key, pixel limit, label out of range).

    One counter may be shared by several pipelines (e.g. every `dataset_fn` call of
    `strategy.distribute_datasets_from_function`): it holds one int64 host variable that the pipelines increment
    atomically from their tf.data threads. Create it **outside** `strategy.scope()`, so it stays a plain variable.

    Example:
      >>> counter = SkippedRecordCounter()
      >>> ds = imagenet_dataset(pattern, True, 224, 64, skip_counter=counter)
      >>> model.fit(ds, ..., callbacks=[SkippedRecordsLogger(counter)])
      >>> counter.result()   # total skipped so far (int)

    Raises:
      RuntimeError: when created inside a `tf.distribute.Strategy` scope.
    """

    def __init__(self, name="skipped_records"):
        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
            raise RuntimeError(
                "Create SkippedRecordCounter outside `strategy.scope()`: inside, its variable would be mirrored "
                "across replicas."
            )
        with tf.init_scope(), tf.device("/CPU:0"):
            self._variable = tf.Variable(0, dtype=tf.int64, trainable=False, name=name)
            self._by_reason = tf.Variable(tf.zeros([len(integrity.SKIP_REASONS)], tf.int64), trainable=False,
                                          name=name + "_by_reason")

    @property
    def variable(self):
        """The int64 scalar `tf.Variable` holding the total count."""
        return self._variable

    def add(self, n):
        """Adds `n` (int64 scalar tensor) to the count; returns the assign op (usable inside tf.data functions)."""
        return self._variable.assign_add(tf.cast(n, tf.int64), read_value=False)

    def add_by_reason(self, counts):
        """Adds `counts` (int64 `[len(SKIP_REASONS)]`, index 0 ignored) to the per-reason counts and their sum to
        the total; returns the op (usable inside tf.data functions)."""
        counts = tf.cast(counts, tf.int64) * tf.constant([0] + [1] * (len(integrity.SKIP_REASONS) - 1), tf.int64)
        return tf.group(self._by_reason.assign_add(counts, read_value=False), self.add(tf.reduce_sum(counts)))

    def result(self):
        """Returns the total number of skipped records so far, as a Python int."""
        return int(self._variable.numpy())

    def result_by_reason(self):
        """Returns {reason name: count} of the skipped records counted per reason (`integrity.SKIP_REASONS`),
        only the reasons with a count > 0. Records counted with `add` (no reason) are not in it."""
        counts = self._by_reason.numpy()
        return {integrity.SKIP_REASONS[i]: int(c) for i, c in enumerate(counts) if i and c}

    def reset(self):
        """Sets the counts back to 0."""
        self._variable.assign(0)
        self._by_reason.assign(tf.zeros_like(self._by_reason))


class SkippedRecordsLogger(keras.callbacks.Callback):
    """Keras callback that reports skipped input records at the end of every epoch.

    It adds `skipped_records` (total so far) and `skipped_records_epoch` (this epoch) to the epoch `logs`, so
    `History` and a `TensorBoard` callback placed **after** it record them, and prints a warning line when the
    epoch skipped any record. A training pipeline reads ahead of the model (shuffle buffer, prefetch), so the
    count includes the records read ahead at the epoch's end; over a whole finite pass it is exact.

    Args:
      counter: the `SkippedRecordCounter` passed to `imagenet_dataset(..., skip_counter=counter)`.
      verbose: int, 1 (default) prints a line for epochs with skipped records; 0 is silent.
      print_fn: callable taking a str, default `print`.

    Raises:
      TypeError: if `counter` is not a `SkippedRecordCounter`.
    """

    def __init__(self, counter, verbose=1, print_fn=print):
        super().__init__()
        if not isinstance(counter, SkippedRecordCounter):
            raise TypeError(f"Argument `counter` must be a SkippedRecordCounter. Received: counter={counter!r}")
        self.counter = counter
        self.verbose = verbose
        self.print_fn = print_fn
        self._at_epoch_begin = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._at_epoch_begin = self.counter.result()

    def on_epoch_end(self, epoch, logs=None):
        total = self.counter.result()
        delta = total - self._at_epoch_begin
        if logs is not None:
            logs["skipped_records"] = total
            logs["skipped_records_epoch"] = delta
        if self.verbose and delta:
            reasons = ", ".join(f"{name}: {n}" for name, n in self.counter.result_by_reason().items())
            libjpeg = jpeg_messages.suppressed_count()  # lines a LibjpegMessageFilter kept off stderr
            self.print_fn(f"Epoch {epoch + 1}: skipped {delta} bad input records ({total} in total"
                          + (f"; by reason since the start: {reasons}" if reasons else "")
                          + (f"; libjpeg's stderr messages about them suppressed: {libjpeg}" if libjpeg else "")
                          + ").")


def _validate_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"Argument `{name}` must be an int > 0. Received: {name}={value!r}")


def _element_seeds(seed):
    """An endless dataset of random int64 scalars, one per record, re-drawn on every iteration (from `seed`)."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)


def _stateless_seed(random):
    """The int64 `[2]` stateless seed of one record from its random int64 scalar."""
    return tf.stack([random, tf.constant(0, tf.int64)])


def _parse_address(address):
    """Splits `grpc://host:port` (or `host:port`) into (protocol, "host:port")."""
    if not isinstance(address, str) or not address:
        raise ValueError(
            f"Argument `data_service_address` must look like 'grpc://host:port'. Received: {address!r}"
        )
    protocol, sep, target = address.partition("://")
    if not sep:
        protocol, target = "grpc", address
    if ":" not in target or not target.rsplit(":", 1)[1].isdigit():
        raise ValueError(
            f"Argument `data_service_address` must look like 'grpc://host:port'. Received: {address!r}"
        )
    return protocol, target


def imagenet_dataset(
    file_pattern,
    is_training,
    image_size,
    batch_size,
    input_context=None,
    label_offset=1,
    *,
    num_classes=None,
    image_key=records.ENCODED_KEY,
    label_key=records.LABEL_KEY,
    train_crop="inception",
    area_range=preprocessing.DEFAULT_AREA_RANGE,
    aspect_ratio_range=preprocessing.DEFAULT_ASPECT_RATIO_RANGE,
    max_attempts=10,
    pad_pixels=4,
    central_fraction=preprocessing.DEFAULT_CENTRAL_FRACTION,
    resize_method="bilinear",
    flip=True,
    mean=preprocessing.IMAGENET_MEAN_RGB,
    stddev=preprocessing.IMAGENET_STDDEV_RGB,
    dtype="float32",
    normalize=None,
    max_pixels=DEFAULT_MAX_PIXELS,
    skip_counter=None,
    repeat=None,
    drop_remainder=None,
    shuffle_buffer_size=10_000,
    cache=None,
    cycle_length=16,
    read_buffer_bytes=DEFAULT_READ_BUFFER_BYTES,
    deterministic=None,
    private_threadpool_size=None,
    data_service_address=None,
    data_service_job_name="tfscale_input",
    seed=None,
    fail_fast_records=integrity.DEFAULT_FAIL_FAST_RECORDS,
    max_pixels_per_byte=integrity.DEFAULT_MAX_PIXELS_PER_BYTE,
    autotune=None,
):
    """Builds the input pipeline of JPEG TFRecords: files → shard → interleave → decode/crop → batch → prefetch.

    Training (`is_training=True`) repeats forever (use `model.fit(ds, epochs=E, steps_per_epoch=S)` with
    `S = num_records // global_batch_size`), shuffles files and records, applies the random crop and flip, drops
    the last partial batch and runs non-deterministically. Evaluation reads every record once, in a
    deterministic order, with the deterministic centre crop, and keeps the last partial batch.

    Each input pipeline reads only its own files: with `input_context`, the sorted files matching
    `file_pattern` are split `files[input_pipeline_id::num_input_pipelines]`; with fewer files than pipelines
    it falls back to splitting records (`Dataset.shard`) with a warning. Either way every record is read by
    exactly one pipeline, once per epoch.

    Args:
      file_pattern: str glob pattern (or list of paths) of TFRecord files.
      is_training: bool, training (random crop, shuffle, repeat) or evaluation (centre crop, one pass).
      image_size: int > 0, output height and width in pixels.
      batch_size: int > 0, the batch of THIS pipeline (with `distribute_datasets_from_function` pass
        `input_context.get_per_replica_batch_size(global_batch_size)`).
      input_context: optional `tf.distribute.InputContext` (`num_input_pipelines`, `input_pipeline_id`).
      label_offset: int subtracted from the stored label: 1 for ImageNet-format records (1-based, default),
        0 for TFDS `imagenet2012` records (0-based, with `image_key="image"`, `label_key="label"`).
      num_classes: optional int > 0; when given, records whose 0-based label is outside `[0, num_classes)` are
        skipped and counted.
      image_key: str, feature key of the JPEG bytes. Default "image/encoded" (TFDS: "image").
      label_key: str, feature key of the int64 label. Default "image/class/label" (TFDS: "label").
      train_crop: "inception" (default; the TPU recipe: sampled crop + fused decode-and-crop) or
        "pad_and_crop" (CIFAR style, for images of a few tens of pixels such as Fashion-MNIST).
      area_range: pair in (0, 1], "inception" crop area as a fraction of the image. Default (0.08, 1.0).
        Use e.g. (0.25, 1.0) or (0.5, 1.0) for small images.
      aspect_ratio_range: pair > 0, "inception" crop width / height. Default (3/4, 4/3).
      max_attempts: int > 0, crop sampling tries before the centre-crop fallback. Default 10.
      pad_pixels: int >= 0, "pad_and_crop" zero padding per side in pixels. Default 4.
      central_fraction: float in (0, 1], evaluation centre crop (and training fallback) fraction of the
        shorter side. Default 224/256. Use 1.0 for tiny images.
      resize_method: "bilinear" (default), "bicubic", "area" or "nearest".
      flip: bool, random left-right flip in training. Default True.
      mean: 3 floats, per-channel RGB mean on the [0, 1] scale. Default ImageNet (0.485, 0.456, 0.406).
      stddev: 3 floats > 0, per-channel RGB std on the [0, 1] scale. Default ImageNet (0.229, 0.224, 0.225).
        Output values are `(pixel / 255 - mean) / stddev`, about [-2.12, 2.64] with the defaults and [0, 1]
        with mean 0 and stddev 1.
      dtype: image dtype, "float32" (default), "bfloat16" or "float16"; with `normalize=False` also "uint8"
        (the cheapest: 1 byte per value, rounded pixel levels).
      normalize: bool; True: output `(pixel / 255 - mean) / stddev` as above; False: output the pixel values in
        [0, 255] and leave the normalisation to the model (`tfscale.models.resnet_imagenet(...,
        input_normalization="imagenet")`, on the accelerator, as the TPU reference does). Default: False for
        `dtype="uint8"`, True otherwise (today's behaviour).
      max_pixels: int > 0, images with height * width above this are skipped (decompression bombs). Default
        89,478,485 (Pillow's limit).
      skip_counter: optional `SkippedRecordCounter` that counts skipped records (may be shared by several
        pipelines). None (default): bad records are still skipped, but not counted. With
        `data_service_address`, failures at the very end of a finite (evaluation) stream are not counted.
      repeat: bool, repeat forever; default `is_training`.
      drop_remainder: bool, drop the last partial batch; default `is_training`.
      shuffle_buffer_size: int > 0, training record shuffle buffer (records). Default 10,000.
      cache: None (default), "raw" (keep this pipeline's serialized records in host memory after the first
        pass) or "decoded". "decoded" for evaluation keeps the preprocessed images (`image_size**2 * 3` values
        each) and later passes skip decoding entirely; for training it keeps every whole decoded image (uint8,
        `height * width * 3` bytes each) after the first pass, and the random crop, resize and flip still run, with
        new random draws, every epoch (for data sets that fit in host memory, e.g. Fashion-MNIST: 141 MB).
        Bad records are counted in the first pass only. Not with `data_service_address` for training.
      cycle_length: int > 0, files read concurrently by the interleave (capped at this pipeline's file count).
        Default 16.
      read_buffer_bytes: int > 0, read buffer of each open file in bytes. Default 1 MiB; raise it (e.g. 8 MiB, the
        TPU reference) for remote file systems.
      deterministic: bool, element order guarantee; default `not is_training`.
      private_threadpool_size: int >= 0, threads of the pipeline's private pool; default `os.cpu_count()`,
        0 uses TF's shared pool.
      autotune: bool, tf.data's autotuning of parallelism and buffer sizes (`tf.data.Options().autotune.enabled`);
        default `is_training`. Off, `AUTOTUNE` parallelism is the private pool's size. It is off for evaluation
        because a finished iterator with autotuning on is destroyed only when its autotuning thread next wakes up,
        up to a minute later (measured: 18 s after a 20 s pause, 29-78 s in the default job), and Keras's `fit`
        destroys the previous validation iterator at every validation, blocking training that long.
      data_service_address: optional "grpc://host:port" of a tf.data service dispatcher: parsing and
        preprocessing run on its workers, which split the files dynamically ("distributed_epoch": every record
        once per epoch across all workers and consumers), and this host only receives batches.
      data_service_job_name: str, job shared by all consumers of the service. Default "tfscale_input".
      seed: optional int, seed of the file and record shuffles and the crop/flip ops.
      fail_fast_records: int > 0 or None. When the first `fail_fast_records` records of this pipeline's stream,
        or its whole first pass, yield no usable example, iterating raises `tf.errors.InvalidArgumentError`
        whose message starts with `integrity.FAIL_FAST_MARKER` and names `file_pattern`, the most common skip
        reason and the key settings (instead of spinning forever on a repeated stream of bad records). Default
        1,000; None keeps only the whole-pass check. Not applied with `data_service_address`.
      max_pixels_per_byte: int > 0 or None, records whose JPEG header claims more pixels per byte of image data
        than this are skipped ("image header larger than its data can hold", e.g. 9000x9000 on a 28x28 image).
        Default 1,024 (an honest baseline JPEG has at most 512); None disables the check.

    Returns:
      A `tf.data.Dataset` of `(images, labels)`: images `dtype [batch_size, image_size, image_size, 3]`
      normalised as above, labels int32 `[batch_size]`, 0-based. The last evaluation batch may be smaller.

    Raises:
      ValueError: if no file matches `file_pattern`, or an argument is out of range (the message names it).

    A record file damaged in the middle (truncated, corrupt framing) ends at the damage: the records before it are
    read, the rest of that file is lost without stopping the other files. `integrity.verify_record_files` names
    such files and their readable counts before training (scripts/train.py does, with `--on_damaged_file`).
    """
    _validate_positive_int("image_size", image_size)
    if max_pixels_per_byte is not None:
        _validate_positive_int("max_pixels_per_byte", max_pixels_per_byte)
    fail_fast = integrity.FailFast(
        fail_fast_records,
        f"Files: {file_pattern}; image_key={image_key}, label_key={label_key}, label_offset={label_offset}, "
        f"num_classes={num_classes}. Presets: TPU reference / Model Garden records use image_key="
        f"{integrity.KEY_PRESETS['tpu'][0]}, label_key={integrity.KEY_PRESETS['tpu'][1]}, label_offset=1; TFDS "
        f"records image_key={integrity.KEY_PRESETS['tfds'][0]}, label_key={integrity.KEY_PRESETS['tfds'][1]}, "
        "label_offset=0.",
    )
    _validate_positive_int("batch_size", batch_size)
    _validate_positive_int("cycle_length", cycle_length)
    _validate_positive_int("max_pixels", max_pixels)
    _validate_positive_int("read_buffer_bytes", read_buffer_bytes)
    _validate_positive_int("shuffle_buffer_size", shuffle_buffer_size)
    if num_classes is not None:
        _validate_positive_int("num_classes", num_classes)
    if train_crop not in preprocessing.TRAIN_CROP_MODES:
        raise ValueError(
            f"Argument `train_crop` must be one of {list(preprocessing.TRAIN_CROP_MODES)}. "
            f"Received: train_crop={train_crop!r}"
        )
    if cache not in (None, "raw", "decoded"):
        raise ValueError(f"Argument `cache` must be None, 'raw' or 'decoded'. Received: cache={cache!r}")
    train_cache = cache == "decoded" and is_training  # whole decoded images cached, random crops every epoch
    if train_cache and data_service_address is not None:
        raise ValueError(
            "Argument `cache='decoded'` with is_training=True caches decoded images on this host and cannot be "
            f"combined with the tf.data service. Received: cache='decoded', data_service_address="
            f"{data_service_address!r}. Use cache='raw' or no cache."
        )
    if skip_counter is not None and not isinstance(skip_counter, SkippedRecordCounter):
        raise TypeError(
            f"Argument `skip_counter` must be a SkippedRecordCounter or None. Received: skip_counter={skip_counter!r}"
        )
    area_range = preprocessing.validate_range("area_range", area_range, 0.0, 1.0)
    aspect_ratio_range = preprocessing.validate_range("aspect_ratio_range", aspect_ratio_range, 0.0, None)
    normalize = (dtype != "uint8" and dtype != tf.uint8) if normalize is None else bool(normalize)
    if normalize:
        out_dtype = preprocessing.output_dtype(dtype)
        # Validate mean/stddev now (a clear error here rather than inside a tf.data function).
        preprocessing.normalize_images(tf.zeros([1, 1, 3]), mean, stddev, dtype)
    else:
        out_dtype = preprocessing.pixel_dtype(dtype)
    # Per-image work before the batch is done in `pixels` (float32 when normalising, else the output dtype, so the
    # flip moves uint8); normalisation, when asked, is per image in the parallel map (cheaper than on the batch).
    pixels = tf.float32 if normalize else out_dtype
    if data_service_address is not None:
        service = _parse_address(data_service_address)
    repeat = is_training if repeat is None else bool(repeat)
    drop_remainder = is_training if drop_remainder is None else bool(drop_remainder)
    deterministic = (not is_training) if deterministic is None else bool(deterministic)

    files = records._match_files(file_pattern)
    num_pipelines = input_context.num_input_pipelines if input_context is not None else 1
    pipeline_id = input_context.input_pipeline_id if input_context is not None else 0
    shard_records = False
    if data_service_address is None and num_pipelines > 1:
        if len(files) >= num_pipelines:
            files = files[pipeline_id::num_pipelines]
        else:
            warnings.warn(
                f"{len(files)} files for {num_pipelines} input pipelines: falling back to record sharding "
                f"(every pipeline reads every file and keeps 1/{num_pipelines} of its records). Write at least "
                "as many shards as input pipelines for file sharding.",
                stacklevel=2,
            )
            shard_records = True

    ds = tf.data.Dataset.from_tensor_slices(files)
    if is_training and cache != "raw":
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def read_file(filename):
        # A damaged file (truncated, corrupt framing) ends at the damage instead of silently ending the stream.
        records_ds = tf.data.TFRecordDataset(filename, buffer_size=read_buffer_bytes).ignore_errors()
        # Record sharding happens inside each file, so it is a partition whatever the interleave order.
        return records_ds.shard(num_pipelines, pipeline_id) if shard_records else records_ds

    ds = ds.interleave(
        read_file,
        cycle_length=min(cycle_length, len(files)),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    # A repeated stream gets a sentinel at the end of every pass (before the shuffle mixes the passes), so an
    # all-bad pass still reaches the fail-fast check; a finite stream gets its sentinel last, below.
    pass_sentinels = repeat and cache != "decoded" and data_service_address is None
    if pass_sentinels:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(tf.constant(_SENTINEL)))
    if cache == "raw":
        ds = ds.cache()
    if repeat and cache != "decoded":
        ds = ds.repeat()
    if is_training and not train_cache:
        ds = ds.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
    # Training crops and flips use stateless random ops, one seed per record from `Dataset.random` (new draws on
    # every iteration), so a seeded pipeline is reproducible whatever the parallelism (and with cache='decoded'
    # the crops still change every epoch).
    seeded = is_training and not train_cache
    if train_cache:
        blank_image = tf.zeros([1, 1, 3], tf.uint8)  # whole decoded images, cropped after the cache
    else:
        blank_image = tf.zeros([image_size, image_size, 3], out_dtype)

    def decode(serialized, element_seed=None):
        # Known problems give a reason code without a failing op (no error, no log line); only a usable record's
        # JPEG is decoded, and a decoder failure is dropped by ignore_errors() and counted from the numbering.
        image_bytes, label, reason = integrity.check_example(
            serialized, image_key, label_key, label_offset, num_classes, max_pixels, max_pixels_per_byte)
        image = tf.cond(tf.equal(reason, integrity.OK), lambda: decode_image(image_bytes, element_seed),
                        lambda: blank_image)
        return image, label, reason

    def decode_image(image_bytes, element_seed):
        if train_cache:
            return tf.io.decode_jpeg(image_bytes, channels=3)  # cropped after the cache, every epoch anew
        if not is_training:
            image = preprocessing.preprocess_for_eval(image_bytes, image_size, central_fraction, resize_method,
                                                      dtype=pixels)
        elif train_crop == "inception":
            image = preprocessing.preprocess_for_train(
                image_bytes,
                image_size,
                area_range,
                aspect_ratio_range,
                max_attempts,
                central_fraction,
                resize_method,
                flip,
                seed,
                stateless_seed=element_seed,
                dtype=pixels,
            )
        else:
            image = preprocessing.preprocess_small_image_for_train(
                image_bytes, image_size, pad_pixels, resize_method, flip, seed, stateless_seed=element_seed,
                dtype=pixels,
            )
        if not normalize:
            return image
        # Normalised per image, inside the parallel map (cheaper than on the batch; see normalize_images).
        return preprocessing.normalize_images(image, mean, stddev, out_dtype)

    count_on_client = skip_counter is not None and data_service_address is not None
    # Exact counting: number the records, decode them in parallel but in order, let ignore_errors() drop the
    # decoder's failures, and count the gaps in the numbering plus the records skipped with a reason. A sentinel
    # record closes a finite stream so that failures at its very end are counted too (not with the data service,
    # whose workers split the files). Without a counter the records are numbered all the same, for the fail-fast
    # check (`integrity.FailFast`).
    if (not repeat or train_cache) and data_service_address is None:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(tf.constant(_SENTINEL)))
    if seeded:
        ds = tf.data.Dataset.zip((ds, _element_seeds(seed)))

    def decode_numbered(index, element):
        serialized, element_seed = (element[0], _stateless_seed(element[1])) if seeded else (element, None)
        is_sentinel = tf.equal(serialized, _SENTINEL)
        # The sentinel is decoded as an empty Example (no image: not decoded, and not counted, see `account`).
        image, label, reason = decode(tf.where(is_sentinel, tf.constant(b""), serialized), element_seed)
        return index, image, label, reason, is_sentinel

    def account(state, element):
        index, image, label, reason, is_sentinel = element
        if data_service_address is None:
            state, gap = fail_fast.step(state, index, reason, is_sentinel)
        else:
            gap = index - state - 1
            state = index
        counts = tf.one_hot(reason, len(integrity.SKIP_REASONS), dtype=tf.int64) * tf.cast(
            tf.logical_not(is_sentinel), tf.int64)
        counts += tf.one_hot(integrity.DECODE_FAILED, len(integrity.SKIP_REASONS), dtype=tf.int64) * gap
        keep = tf.logical_and(tf.logical_not(is_sentinel), tf.equal(reason, integrity.OK))
        return state, (image, label, counts, keep)

    initial = fail_fast.initial_state() if data_service_address is None else tf.constant(-1, tf.int64)
    ds = ds.enumerate()
    ds = ds.map(decode_numbered, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.scan(initial, account)
    if count_on_client:
        # The service workers cannot update this host's variable: the counts of skipped records travel with the
        # next kept record inside the batch instead, and are added on the consuming host.
        def carry(pending, element):
            image, label, counts, keep = element
            total = pending + counts
            return tf.where(keep, tf.zeros_like(total), total), (image, label, total, keep)

        ds = ds.scan(tf.zeros([len(integrity.SKIP_REASONS)], tf.int64), carry)
        ds = ds.filter(lambda image, label, counts, keep: keep)
        ds = ds.map(lambda image, label, counts, keep: (image, label, counts))
    elif skip_counter is None:
        ds = ds.filter(lambda image, label, counts, keep: keep)
    else:

        def count_and_keep(image, label, counts, keep):
            del image, label
            counted = tf.cond(tf.reduce_sum(counts) > 0, lambda: skip_counter.add_by_reason(counts), tf.no_op)
            with tf.control_dependencies([counted]):
                return tf.identity(keep)

        ds = ds.filter(count_and_keep)
    if not count_on_client:
        ds = ds.map(lambda image, label, *_: (image, label))
    if cache == "decoded":
        # Evaluation: the preprocessed images. Training: the whole decoded images, cropped below. Bad records are
        # counted in the first pass only.
        ds = ds.cache()
        if repeat:
            ds = ds.repeat()
    if train_cache:
        ds = ds.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)

        def crop_cached(image_label, random):
            image, label = image_label
            image = preprocessing.preprocess_pixels_for_train(
                image, image_size, train_crop, area_range, aspect_ratio_range, max_attempts, central_fraction,
                pad_pixels, resize_method, flip, seed, stateless_seed=_stateless_seed(random), dtype=pixels,
            )
            return (preprocessing.normalize_images(image, mean, stddev, out_dtype) if normalize else image), label

        ds = tf.data.Dataset.zip((ds, _element_seeds(seed)))
        ds = ds.map(crop_cached, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=deterministic)

    if data_service_address is not None:
        protocol, target = service
        ds = ds.apply(
            tf.data.experimental.service.distribute(
                processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
                service=f"{protocol}://{target}",
                job_name=data_service_job_name,
            )
        )
        if count_on_client:

            def count_on_host(images, labels, counts):
                with tf.control_dependencies([skip_counter.add_by_reason(tf.reduce_sum(counts, axis=0))]):
                    return tf.identity(images), labels

            ds = ds.map(count_on_host)

    options = tf.data.Options()
    options.deterministic = deterministic
    options.threading.private_threadpool_size = (
        os.cpu_count() or 1 if private_threadpool_size is None else int(private_threadpool_size)
    )
    options.autotune.enabled = is_training if autotune is None else bool(autotune)
    options.experimental_optimization.map_parallelization = True
    options.experimental_optimization.parallel_batch = True
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)
