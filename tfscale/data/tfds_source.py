"""TFDS as a data source: train on an image-classification data set prepared by TensorFlow Datasets.

Most people hold ImageNet as TFDS prepared it (`imagenet2012`: shards `imagenet2012-train.tfrecord-*`, keys
`image` and `label`, **0-based** labels). `tfds_dataset` reads such a data set with tfscale's input pipeline, so the
fused decode-and-crop of the TPU reference (Ying et al., arXiv:1811.06992) still applies to its JPEG bytes:

    tfds.builder(name, data_dir).info ─▶ the split's shard files, keys, classes ─▶ `imagenet_dataset(files,
    image_key, label_key, label_offset=0, num_classes)` (file sharding per input pipeline, counted skips, fused
    decode-and-crop, optional decoded-image cache)

The builder's metadata gives the files, the example counts and the number of classes; nothing is downloaded or
prepared here (`download_and_prepare` is the user's step, e.g. with ImageNet's manually downloaded archives).

Two readers give the same examples:

* `reader="files"` (the default for TFRecord shards): tfscale's `imagenet_dataset` reads TFDS's shards directly.
  Every input pipeline reads only its own shards (`InputContext`), bad records are skipped and counted, and the
  pipeline fails fast on unusable data.
* `reader="as_dataset"` (the default for other file formats, e.g. ArrayRecord): `builder.as_dataset(split,
  decoders={image_key: tfds.decode.SkipDecoding()}, read_config=tfds.ReadConfig(input_context=...))`, then the
  same per-image preprocessing (`tfscale.data.preprocessing`). Undecodable JPEGs are dropped by `ignore_errors()`
  but not counted.

Images must be stored as JPEG (`tfds.features.Image(encoding_format="jpeg")`, as in `imagenet2012`). Data sets that
store PNG (e.g. `cifar10`) can be converted to tfscale's records with `scripts/build_tfrecords.py
--source=tfds:<name>`, which re-encodes them as JPEG (`convert_tfds`).
"""

import os
import warnings

import numpy as np
import tensorflow as tf

from tfscale.data import pipeline
from tfscale.data import preprocessing
from tfscale.data import records

#: Prefix of a TFDS data set in `scripts/train.py --dataset` and `scripts/build_tfrecords.py --source`.
TFDS_PREFIX = "tfds:"
READERS = ("auto", "files", "as_dataset")
#: Splits tried, in order, for evaluation when none is given.
EVAL_SPLITS = ("validation", "test")


def parse_tfds_name(spec):
    """Returns the TFDS data-set name of "tfds:<name>" (e.g. "tfds:imagenet2012" or "tfds:my_set/config:1.0.0").

    Raises:
      ValueError: if `spec` does not start with "tfds:" or names nothing.
    """
    if not isinstance(spec, str) or not spec.startswith(TFDS_PREFIX) or not spec[len(TFDS_PREFIX):]:
        raise ValueError(f"Expected 'tfds:<name>' (e.g. 'tfds:imagenet2012'). Received: {spec!r}")
    return spec[len(TFDS_PREFIX):]


def _builder(name, data_dir):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tensorflow-datasets is a dependency of tfscale
        raise ImportError("TFDS sources need tensorflow-datasets: pip install tensorflow-datasets") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for an unknown or absent data set
        raise ValueError(
            f"TFDS data set {name!r} was not found in data_dir={data_dir!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Prepare it first (tfds.builder(name, "
            "data_dir=...).download_and_prepare()) or pass the directory that holds it."
        ) from None
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        raise ValueError(
            f"TFDS data set {name!r} is not prepared in data_dir={data_dir!r} (no {builder.data_dir}/"
            "dataset_info.json). Run tfds.builder(name, data_dir=...).download_and_prepare() first."
        )
    return builder


def tfds_info(name, data_dir=None, *, train_split="train", eval_split=None, image_key=None, label_key=None):
    """Reads what a training run needs from a prepared TFDS data set's metadata (no data is read).

    Args:
      name: str, TFDS name, e.g. "imagenet2012" (optionally "name/config:version").
      data_dir: str or None, the TFDS data directory (None: TFDS's default, `~/tensorflow_datasets` or
        `$TFDS_DATA_DIR`).
      train_split: str, the training split. Default "train".
      eval_split: str or None, the evaluation split; default the first of "validation", "test" that exists.
      image_key: str or None, feature of the encoded image; default the builder's supervised keys' input, else
        "image".
      label_key: str or None, `ClassLabel` feature of the label; default the supervised keys' target, else "label".

    Returns:
      dict: `name`, `data_dir`, `train_split`, `eval_split`, `num_train_examples`, `num_eval_examples` (ints),
      `num_classes` (int), `class_names` (list of str), `image_key`, `label_key`, `file_format` (str),
      `image_encoding` (str or None), `label_offset` (0: TFDS labels are 0-based).

    Raises:
      ValueError: if the data set is absent or unprepared, a split or key does not exist, or the label feature
        is not a `ClassLabel` (each message names the value and what was expected).
    """
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir)
    info = builder.info
    supervised = tuple(info.supervised_keys or ())
    image_key = image_key or (supervised[0] if len(supervised) == 2 and isinstance(supervised[0], str) else "image")
    label_key = label_key or (supervised[1] if len(supervised) == 2 and isinstance(supervised[1], str) else "label")
    features = info.features
    for key, what in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in features:
            raise ValueError(f"TFDS data set {name!r} has no feature {key!r} (argument `{what}`); its features "
                             f"are {sorted(features.keys())}.")
    label_feature = features[label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(f"TFDS feature {label_key!r} of {name!r} must be a ClassLabel to give the number of "
                         f"classes. Received: {type(label_feature).__name__}")
    splits = dict(info.splits.items())
    if train_split not in splits:
        raise ValueError(f"TFDS data set {name!r} has no split {train_split!r}; its splits are {sorted(splits)}.")
    if eval_split is None:
        eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
        if eval_split is None:
            raise ValueError(f"TFDS data set {name!r} has none of the evaluation splits {list(EVAL_SPLITS)}; its "
                             f"splits are {sorted(splits)}. Name one explicitly.")
    elif eval_split not in splits:
        raise ValueError(f"TFDS data set {name!r} has no split {eval_split!r}; its splits are {sorted(splits)}.")
    image_feature = features[image_key]
    return {
        "name": name,
        "data_dir": data_dir,
        "train_split": train_split,
        "eval_split": eval_split,
        "num_train_examples": int(splits[train_split].num_examples),
        "num_eval_examples": int(splits[eval_split].num_examples),
        "num_classes": int(label_feature.num_classes),
        "class_names": list(label_feature.names),
        "image_key": image_key,
        "label_key": label_key,
        "file_format": str(getattr(info.file_format, "value", info.file_format) or "tfrecord"),
        "image_encoding": getattr(image_feature, "encoding_format", None),
        "label_offset": 0,
    }


def tfds_split_files(name, split, data_dir=None):
    """Returns the sorted full paths of the shard files of one split of a prepared TFDS data set.

    Raises:
      ValueError: if the data set or the split does not exist.
    """
    builder = _builder(name, data_dir)
    splits = dict(builder.info.splits.items())
    if split not in splits:
        raise ValueError(f"TFDS data set {name!r} has no split {split!r}; its splits are {sorted(splits)}.")
    return sorted(str(p) for p in splits[split].filepaths)


def tfds_dataset(
    name,
    split,
    is_training,
    image_size,
    batch_size,
    input_context=None,
    *,
    data_dir=None,
    image_key=None,
    label_key=None,
    reader="auto",
    skip_counter=None,
    seed=None,
    **pipeline_kwargs,
):
    """Builds tfscale's input pipeline over a split of a prepared TFDS image-classification data set.

    Args:
      name: str, TFDS name, e.g. "imagenet2012".
      split: str, e.g. "train" or "validation" (whole splits; TFDS slicing such as "train[:10%]" needs
        `reader="as_dataset"`).
      is_training: bool, training (random crop, shuffle, repeat) or evaluation (centre crop, one pass).
      image_size: int > 0, output height and width in pixels.
      batch_size: int > 0, the batch of this pipeline (per replica with `distribute_datasets_from_function`).
      input_context: optional `tf.distribute.InputContext`; each input pipeline reads its own shards.
      data_dir: str or None, the TFDS data directory (None: TFDS's default).
      image_key: str or None, the image feature (default: from the builder's supervised keys, else "image").
      label_key: str or None, the `ClassLabel` feature (default: from the supervised keys, else "label").
      reader: "auto" (default: "files" for TFRecord shards, else "as_dataset"), "files" or "as_dataset"; see the
        module docstring.
      skip_counter: optional `SkippedRecordCounter` ("files" reader only; "as_dataset" drops bad images uncounted).
      seed: optional int, seed of the shuffles and the random crops and flips.
      **pipeline_kwargs: further arguments of `tfscale.data.imagenet_dataset` (dtype, cache, train_crop,
        area_range, central_fraction, shuffle_buffer_size, ...). `num_classes` defaults to the builder's.

    Returns:
      A `tf.data.Dataset` of `(images, labels)` as `imagenet_dataset` returns them: images `[batch_size,
      image_size, image_size, 3]` (dtype as asked; uint8 pixels or normalised floats), labels int32 `[batch_size]`,
      0-based, the TFDS label ids.

    Raises:
      ValueError: for an absent data set, split or key, a non-JPEG image encoding, or a bad `reader`.
    """
    if reader not in READERS:
        raise ValueError(f"Argument `reader` must be one of {list(READERS)}. Received: reader={reader!r}")
    info = tfds_info(name, data_dir, train_split=split, eval_split=split, image_key=image_key, label_key=label_key)
    if info["image_encoding"] not in ("jpeg", "jpg"):
        raise ValueError(
            f"TFDS data set {name!r} stores its {info['image_key']!r} images as {info['image_encoding'] or 'png'}; "
            "tfscale's pipeline decodes JPEG (fused decode-and-crop). Convert it with scripts/build_tfrecords.py "
            f"--source=tfds:{name} (re-encodes as JPEG) and train with --dataset=imagenet."
        )
    pipeline_kwargs.setdefault("num_classes", info["num_classes"])
    if "label_offset" in pipeline_kwargs and pipeline_kwargs["label_offset"] != 0:
        raise ValueError(f"TFDS labels are 0-based: argument `label_offset` must be 0. Received: "
                         f"label_offset={pipeline_kwargs['label_offset']!r}")
    pipeline_kwargs.pop("label_offset", None)
    if reader == "auto":
        reader = "files" if info["file_format"] == "tfrecord" else "as_dataset"
    if reader == "files":
        files = tfds_split_files(name, split, data_dir)
        return pipeline.imagenet_dataset(
            files, is_training, image_size, batch_size, input_context, 0, image_key=info["image_key"],
            label_key=info["label_key"], skip_counter=skip_counter, seed=seed, **pipeline_kwargs)
    return _as_dataset_pipeline(name, split, is_training, image_size, batch_size, input_context, data_dir, info,
                                seed, pipeline_kwargs)


def _as_dataset_pipeline(name, split, is_training, image_size, batch_size, input_context, data_dir, info, seed,
                         kwargs):
    """`builder.as_dataset(..., decoders={image: SkipDecoding()})` → fused decode-and-crop → batch → prefetch."""
    import tensorflow_datasets as tfds

    # Arguments of the record reader that do not apply here are accepted when unset (scripts/train.py passes them).
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("normalize",)}
    for key in ("fail_fast_records", "max_pixels_per_byte", "max_pixels"):  # record-integrity checks: files only
        kwargs.pop(key, None)
    unsupported = sorted(set(kwargs) - {"num_classes", "dtype", "normalize", "train_crop", "area_range",
                                        "aspect_ratio_range", "max_attempts", "pad_pixels", "central_fraction",
                                        "resize_method", "flip", "mean", "stddev", "repeat", "drop_remainder",
                                        "shuffle_buffer_size", "deterministic", "private_threadpool_size",
                                        "autotune"})
    if unsupported:
        raise ValueError(f"reader='as_dataset' does not support the arguments {unsupported}; use reader='files' "
                         "(TFRecord shards) for them.")
    dtype = kwargs.get("dtype", "float32")
    normalize = kwargs.get("normalize")
    normalize = (dtype != "uint8") if normalize is None else bool(normalize)
    out_dtype = preprocessing.output_dtype(dtype) if normalize else preprocessing.pixel_dtype(dtype)
    pixels = tf.float32 if normalize else out_dtype
    repeat = kwargs.get("repeat", is_training)
    drop_remainder = kwargs.get("drop_remainder", is_training)
    deterministic = kwargs.get("deterministic", not is_training)
    num_classes = kwargs["num_classes"]
    image_key, label_key = info["image_key"], info["label_key"]
    builder = _builder(name, data_dir)
    num_shards = dict(builder.info.splits.items())[split].num_shards
    shard_examples = input_context is not None and input_context.num_input_pipelines > max(1, num_shards)
    if shard_examples:
        warnings.warn(f"{num_shards} TFDS shards for {input_context.num_input_pipelines} input pipelines: every "
                      "pipeline reads every shard and keeps its share of the examples.", stacklevel=3)
    read_config = tfds.ReadConfig(
        shuffle_seed=seed, try_autocache=False, skip_prefetch=True,
        input_context=None if shard_examples else input_context,
    )
    ds = builder.as_dataset(split=split, shuffle_files=is_training, read_config=read_config,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    if shard_examples:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if repeat:
        ds = ds.repeat()
    if is_training:
        ds = ds.shuffle(kwargs.get("shuffle_buffer_size", 10_000), seed=seed, reshuffle_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)))
    else:
        ds = ds.map(lambda example: (example, tf.constant(0, tf.int64)))
    train_args = {k: kwargs[k] for k in ("area_range", "aspect_ratio_range", "max_attempts", "central_fraction",
                                         "resize_method", "flip") if k in kwargs}

    def decode(example, random):
        image_bytes, label = example[image_key], tf.cast(example[label_key], tf.int32)
        tf.debugging.assert_less(label, num_classes, message="label out of range")
        stateless = tf.stack([random, tf.constant(0, tf.int64)])
        if not is_training:
            image = preprocessing.preprocess_for_eval(
                image_bytes, image_size, kwargs.get("central_fraction", preprocessing.DEFAULT_CENTRAL_FRACTION),
                kwargs.get("resize_method", "bilinear"), dtype=pixels)
        elif kwargs.get("train_crop", "inception") == "inception":
            image = preprocessing.preprocess_for_train(image_bytes, image_size, stateless_seed=stateless,
                                                       dtype=pixels, **train_args)
        else:
            image = preprocessing.preprocess_small_image_for_train(
                image_bytes, image_size, kwargs.get("pad_pixels", 4), kwargs.get("resize_method", "bilinear"),
                kwargs.get("flip", True), stateless_seed=stateless, dtype=pixels)
        if normalize:
            image = preprocessing.normalize_images(
                image, kwargs.get("mean", preprocessing.IMAGENET_MEAN_RGB),
                kwargs.get("stddev", preprocessing.IMAGENET_STDDEV_RGB), out_dtype)
        return image, label

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic).ignore_errors()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = deterministic
    threads = kwargs.get("private_threadpool_size")
    options.threading.private_threadpool_size = os.cpu_count() or 1 if threads is None else int(threads)
    # As imagenet_dataset: no autotuning for a finite evaluation pass (its finished iterator would block its
    # destruction for up to a minute).
    autotune = kwargs.get("autotune")
    options.autotune.enabled = is_training if autotune is None else bool(autotune)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def convert_tfds(name, output_dir, split, output_split, num_shards, *, data_dir=None, image_key=None, label_key=None,
                 jpeg_quality=95, progress=True):
    """Converts one split of a prepared TFDS image-classification data set to tfscale's ImageNet-format records.

    JPEG images are copied byte for byte; other encodings (PNG, ...) are decoded and re-encoded as JPEG at
    `jpeg_quality`. Labels are stored 1-based (TFDS label + 1), the ImageNet-record convention, with the class
    names as `image/class/synset`, and the split metadata (`<output_split>.metadata.json`) gets the counts and
    class names, so `scripts/train.py --dataset=imagenet --data_dir=<output_dir>` reads the result.

    Args:
      name: str, TFDS name.
      output_dir: str, directory of the shards.
      split: str, the TFDS split to read ("train", "validation", "test", ...).
      output_split: str, tfscale's split name ("train" or "validation").
      num_shards: int > 0, shards to write.
      data_dir, image_key, label_key: as in `tfds_info`.
      jpeg_quality: int in [1, 100], quality of re-encoded images. Default 95.
      progress: bool, draw a progress bar on stderr. Default True.

    Returns:
      dict, the metadata written (num_examples, num_shards, file_pattern, class names, ...).

    Raises:
      ValueError: as `tfds_info`.
    """
    import tensorflow_datasets as tfds

    info = tfds_info(name, data_dir, train_split=split, eval_split=split, image_key=image_key, label_key=label_key)
    builder = _builder(name, data_dir)
    is_jpeg = info["image_encoding"] in ("jpeg", "jpg")
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={info["image_key"]: tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(try_autocache=False))
    names = info["class_names"]

    def examples():
        for example in ds.as_numpy_iterator():
            data = example[info["image_key"]]
            label = int(example[info["label_key"]])
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            height, width = int(image.shape[0]), int(image.shape[1])
            if not is_jpeg:
                data = tf.io.encode_jpeg(image, quality=jpeg_quality).numpy()
            filename = example.get("file_name", b"")
            filename = filename.decode("utf-8", "replace") if isinstance(filename, (bytes, np.bytes_)) else ""
            yield records.make_example(data, label + 1, height, width, 3, synset=names[label], text=names[label],
                                       filename=filename).SerializeToString()

    return records.write_sharded_records(
        examples(), output_dir, output_split, num_shards, num_examples=info["num_train_examples"],
        metadata={"num_classes": info["num_classes"], "class_names": names, "synsets": names, "label_offset": 1,
                  "source": f"{TFDS_PREFIX}{name}/{split}"},
        progress=progress)
