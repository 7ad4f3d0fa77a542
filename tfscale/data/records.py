"""ImageNet-format TFRecords: keys, `tf.train.Example` writer, sharded atomic writing and converters.

The record format is the one of the TPU reference (`build_imagenet_data.py`) and of TF Model Garden, used by
Ying et al., "Image Classification at Supercomputer Scale", arXiv:1811.06992:

========================= ======= =====================================================
key                       type    value
========================= ======= =====================================================
``image/encoded``         bytes   JPEG bytes
``image/format``          bytes   ``b"JPEG"``
``image/class/label``     int64   **1-based** class index (1..num_classes; 0 = background)
``image/class/synset``    bytes   class id, e.g. ``b"n01440764"``
``image/class/text``      bytes   human-readable class name
``image/filename``        bytes   source file name
``image/height``          int64   pixels
``image/width``           int64   pixels
``image/channels``        int64   1 (grey) or 3
``image/colorspace``      bytes   ``b"RGB"`` or ``b"Grayscale"``
========================= ======= =====================================================

Shards are named ``<split>-<index:05d>-of-<num_shards:05d>`` (``train-00003-of-00008``); the metadata file's name,
``<split>.metadata.json``, does not match the usual ``train-*`` pattern. Every shard is first
written as ``.<name>.tmp-<pid>`` and renamed when complete, and a ``<split>.metadata.json`` (record counts,
class names) is renamed into place last, so a directory that has the metadata holds a complete conversion.
"""

import json
import os
import time

import numpy as np
import tensorflow as tf

ENCODED_KEY = "image/encoded"
FORMAT_KEY = "image/format"
LABEL_KEY = "image/class/label"
SYNSET_KEY = "image/class/synset"
TEXT_KEY = "image/class/text"
FILENAME_KEY = "image/filename"
HEIGHT_KEY = "image/height"
WIDTH_KEY = "image/width"
CHANNELS_KEY = "image/channels"
COLORSPACE_KEY = "image/colorspace"

#: Keys of the TFDS `imagenet2012` records (0-based labels): read them with `label_offset=0`.
TFDS_IMAGE_KEY = "image"
TFDS_LABEL_KEY = "label"
TFDS_FILENAME_KEY = "file_name"

METADATA_SUFFIX = ".metadata.json"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif")


def _bytes_feature(value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(encoded, label, height, width, channels, synset="", text="", filename="", image_format="JPEG"):
    """Builds one ImageNet-format `tf.train.Example`.

    Args:
      encoded: bytes, the encoded image (JPEG for the tfscale pipeline).
      label: int >= 0, the class label as stored (1-based for ImageNet format; 0 means background).
      height: int > 0, image height in pixels.
      width: int > 0, image width in pixels.
      channels: int, 1 (grey) or 3 (RGB).
      synset: str, class id (e.g. "n01440764"). Default "".
      text: str, human-readable class name. Default "".
      filename: str, source file name. Default "".
      image_format: str, "JPEG" (default) or "PNG".

    Returns:
      A `tf.train.Example` with the keys listed in the module docstring.

    Raises:
      ValueError: for a negative label, a non-positive size or channels not in (1, 3).
    """
    if int(label) < 0:
        raise ValueError(f"Argument `label` must be >= 0 (1-based class index). Received: label={label!r}")
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"Arguments `height` and `width` must be > 0. Received: height={height!r}, width={width!r}")
    if int(channels) not in (1, 3):
        raise ValueError(f"Argument `channels` must be 1 or 3. Received: channels={channels!r}")
    feature = {
        ENCODED_KEY: _bytes_feature(bytes(encoded)),
        FORMAT_KEY: _bytes_feature(image_format),
        LABEL_KEY: _int64_feature(label),
        SYNSET_KEY: _bytes_feature(synset),
        TEXT_KEY: _bytes_feature(text),
        FILENAME_KEY: _bytes_feature(filename),
        HEIGHT_KEY: _int64_feature(height),
        WIDTH_KEY: _int64_feature(width),
        CHANNELS_KEY: _int64_feature(channels),
        COLORSPACE_KEY: _bytes_feature("RGB" if int(channels) == 3 else "Grayscale"),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def parse_example(serialized):
    """Parses one serialized ImageNet-format example into a dict of numpy values (for tests and tools).

    Args:
      serialized: bytes, one serialized `tf.train.Example`.

    Returns:
      dict: key -> bytes (bytes features) or int (int64 features), for every key present.
    """
    example = tf.train.Example.FromString(serialized)
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value)
        out[key] = values[0] if len(values) == 1 else values
    return out


def shard_names(split, num_shards):
    """Returns the shard file names `<split>-00000-of-0000N` ... for `num_shards` shards.

    Args:
      split: str, e.g. "train" or "validation".
      num_shards: int > 0.

    Returns:
      list of `num_shards` str file names (no directory).

    Raises:
      ValueError: if `num_shards` is not a positive int.
    """
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards <= 0:
        raise ValueError(f"Argument `num_shards` must be an int > 0. Received: num_shards={num_shards!r}")
    return [f"{split}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def file_pattern(output_dir, split):
    """Returns the glob pattern matching the shards of `split` in `output_dir` (`<dir>/<split>-*-of-*`)."""
    return os.path.join(output_dir, f"{split}-*-of-*")


def metadata_path(output_dir, split):
    """Returns the path of the metadata JSON of `split` in `output_dir` (`<dir>/<split>.metadata.json`)."""
    return os.path.join(output_dir, split + METADATA_SUFFIX)


class _Progress:
    """The converter's progress: Keras's `keras.utils.Progbar` (records written, time per record, ETA), on stdout
    like Keras's own progress bars, redrawn at most every 0.2 s."""

    def __init__(self, total, desc, enabled=True, stream=None):
        del stream  # Progbar writes where Keras's progress bars do (stdout)
        self.total, self.enabled = total, enabled
        self.count = 0
        self.last = time.monotonic()
        self._bar = None
        if enabled:
            import keras

            print(desc, flush=True)
            self._bar = keras.utils.Progbar(total, unit_name="record")

    def update(self, n=1):
        self.count += n
        now = time.monotonic()
        if self._bar is not None and now - self.last > 0.2 and self.count != self.total:  # close() draws the end
            self.last = now
            self._bar.update(self.count)

    def close(self):
        if self._bar is not None:
            self._bar.update(self.count, finalize=True)
            self._bar = None


def write_sharded_records(
    serialized_examples, output_dir, split, num_shards, num_examples=None, metadata=None, progress=True
):
    """Writes serialized examples round-robin into `num_shards` shards, atomically.

    Every shard is written under a temporary name and renamed into place only after all shards are complete;
    then `<split>.metadata.json` (with `num_examples`, `num_shards`, the shard names and `metadata`) is renamed
    into place. If anything fails, the temporary files are removed and no shard of this call is left behind.

    Args:
      serialized_examples: iterable of bytes (serialized `tf.train.Example`s).
      output_dir: str, directory (created if missing).
      split: str, shard name prefix, e.g. "train".
      num_shards: int > 0, number of shards.
      num_examples: optional int, expected count (only for the progress bar's total and ETA).
      metadata: optional JSON-serialisable dict merged into the metadata file (e.g. class names).
      progress: bool, draw a progress bar on stderr. Default True.

    Returns:
      dict: the metadata written (`num_examples`, `num_shards`, `files`, `file_pattern`, plus `metadata`).

    Raises:
      ValueError: for a bad `num_shards` or when `serialized_examples` is empty.
    """
    names = shard_names(split, num_shards)
    tf.io.gfile.makedirs(output_dir)
    token = f"{os.getpid()}-{int(time.time() * 1e6)}"
    finals = [os.path.join(output_dir, n) for n in names]
    temps = [os.path.join(output_dir, f".{n}.tmp-{token}") for n in names]
    writers = [tf.io.TFRecordWriter(t) for t in temps]
    bar = _Progress(num_examples, f"{split}: writing {num_shards} shards", progress)
    count = 0
    try:
        for count, serialized in enumerate(serialized_examples, start=1):
            writers[(count - 1) % num_shards].write(serialized)
            bar.update()
        for w in writers:
            w.close()
        if count == 0:
            raise ValueError(f"No examples to write for split {split!r} into {output_dir!r}.")
        for t, f in zip(temps, finals):
            tf.io.gfile.rename(t, f, overwrite=True)
        info = dict(metadata or {})
        info.update(
            {
                "split": split,
                "num_examples": count,
                "num_shards": num_shards,
                "files": names,
                "file_pattern": file_pattern(output_dir, split),
            }
        )
        meta_tmp = os.path.join(output_dir, f".{split}{METADATA_SUFFIX}.tmp-{token}")
        with tf.io.gfile.GFile(meta_tmp, "w") as fh:
            json.dump(info, fh, indent=1)
        tf.io.gfile.rename(meta_tmp, metadata_path(output_dir, split), overwrite=True)
        return info
    finally:
        bar.close()
        for w in writers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - closing twice is harmless; we only clean up
                pass
        for t in temps:
            if tf.io.gfile.exists(t):
                tf.io.gfile.remove(t)


def read_metadata(output_dir, split):
    """Reads `<split>.metadata.json` written by `write_sharded_records`.

    Args:
      output_dir: str, the records directory.
      split: str, e.g. "train".

    Returns:
      dict, or None when the file does not exist (conversion never finished).
    """
    path = metadata_path(output_dir, split)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as fh:
        return json.load(fh)


def count_records(file_pattern_or_files):
    """Number of records in the files matching a pattern, without parsing them.

    If every matched file is listed in a `*.metadata.json` next to it whose `files` are exactly the matched
    files, the count comes from the metadata (no I/O on the shards); otherwise the records are counted with one
    fast pass of `tf.data.TFRecordDataset`.

    Args:
      file_pattern_or_files: str glob pattern, or a list of file paths.

    Returns:
      int, the number of records.

    Raises:
      ValueError: if no file matches.
    """
    files = _match_files(file_pattern_or_files)
    directory = os.path.dirname(files[0])
    basenames = sorted(os.path.basename(f) for f in files)
    if all(os.path.dirname(f) == directory for f in files):
        for meta_file in tf.io.gfile.glob(os.path.join(directory, "*" + METADATA_SUFFIX)):
            with tf.io.gfile.GFile(meta_file) as fh:
                info = json.load(fh)
            if sorted(info.get("files", [])) == basenames and "num_examples" in info:
                return int(info["num_examples"])
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 8))
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def _match_files(file_pattern_or_files):
    if isinstance(file_pattern_or_files, (list, tuple)):
        files = sorted(str(f) for f in file_pattern_or_files)
    else:
        files = sorted(tf.io.gfile.glob(file_pattern_or_files))
    if not files:
        raise ValueError(f"No TFRecord files match file_pattern={file_pattern_or_files!r}.")
    return files


def _encode_jpeg_dataset(images, quality):
    """A tf.data pipeline that JPEG-encodes uint8 `[N, H, W]` / `[N, H, W, C]` images in parallel."""

    def encode(image):
        if image.shape.rank == 2:
            image = image[..., None]
        return tf.io.encode_jpeg(image, quality=quality, chroma_downsampling=False)

    return (
        tf.data.Dataset.from_tensor_slices(images)
        .map(encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def convert_arrays(
    images,
    labels,
    output_dir,
    split,
    num_shards,
    class_names=None,
    synsets=None,
    label_offset=1,
    quality=95,
    filename_prefix=None,
    progress=True,
):
    """Converts in-memory image arrays (e.g. decoded IDX files) to sharded ImageNet-format TFRecords.

    Each image is JPEG-encoded (quality `quality`, no chroma subsampling), stored with label
    `labels[i] + label_offset` (1-based by default), the synset/text of its class and a file name
    `<filename_prefix>_<i:06d>.JPEG`.

    Args:
      images: uint8 array `[N, height, width]` (grey) or `[N, height, width, 1 or 3]`.
      labels: int array `[N]`, 0-based class indices in [0, num_classes).
      output_dir: str, directory for the shards and metadata.
      split: str, e.g. "train" or "validation".
      num_shards: int > 0, number of shards.
      class_names: optional list of str (num_classes entries), stored as `image/class/text`.
      synsets: optional list of str (num_classes entries), stored as `image/class/synset`. Default: the class
        names (or `class_<k>`).
      label_offset: int, added to `labels` when writing. Default 1 (ImageNet format, 0 = background).
      quality: int in [1, 100], JPEG quality. Default 95.
      filename_prefix: str, default `split`.
      progress: bool, progress bar on stderr. Default True.

    Returns:
      dict, the metadata written (see `write_sharded_records`), with `num_classes`, `class_names`, `synsets`
      and `label_offset`.

    Raises:
      ValueError: for an empty array, mismatched lengths, a bad dtype or shape, or labels out of range.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.size == 0 or images.shape[0] == 0:
        raise ValueError(f"Argument `images` is empty. Received: images.shape={images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"Argument `images` must be uint8. Received: images.dtype={images.dtype}")
    if images.ndim == 4 and images.shape[-1] not in (1, 3) or images.ndim not in (3, 4):
        raise ValueError(
            "Argument `images` must have shape [N, H, W] or [N, H, W, 1|3]. " f"Received: images.shape={images.shape}"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"Argument `labels` must have shape [{images.shape[0]}] (one per image). Received: labels.shape={labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Argument `labels` must be integers. Received: labels.dtype={labels.dtype}")
    num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Argument `labels` must be 0-based in [0, {num_classes}). "
            f"Received: labels in [{labels.min()}, {labels.max()}]"
        )
    class_names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(num_classes)]
    synsets = list(synsets) if synsets is not None else list(class_names)
    if len(synsets) != num_classes:
        raise ValueError(f"Argument `synsets` must have {num_classes} entries. Received: {len(synsets)} entries")
    height, width = images.shape[1], images.shape[2]
    channels = 1 if images.ndim == 3 else images.shape[3]
    prefix = filename_prefix or split

    def examples():
        for i, encoded in enumerate(_encode_jpeg_dataset(images, quality).as_numpy_iterator()):
            k = int(labels[i])
            yield make_example(
                encoded,
                k + label_offset,
                height,
                width,
                channels,
                synset=synsets[k],
                text=class_names[k],
                filename=f"{prefix}_{i:06d}.JPEG",
            ).SerializeToString()

    return write_sharded_records(
        examples(),
        output_dir,
        split,
        num_shards,
        num_examples=images.shape[0],
        metadata={
            "num_classes": num_classes,
            "class_names": class_names,
            "synsets": synsets,
            "label_offset": label_offset,
        },
        progress=progress,
    )


def _list_images(directory):
    return sorted(
        f
        for f in tf.io.gfile.listdir(directory)
        if not tf.io.gfile.isdir(os.path.join(directory, f)) and f.lower().endswith(IMAGE_EXTENSIONS)
    )


def _read_synset_texts(path):
    """Reads `synset_words.txt`-style lines `n01440764 tench, Tinca tinca` into a dict."""
    texts = {}
    with tf.io.gfile.GFile(path) as fh:
        for line in fh:
            parts = line.strip().split(None, 1)
            if parts:
                texts[parts[0]] = parts[1] if len(parts) > 1 else parts[0]
    return texts


def _read_validation_labels(path, filenames):
    """Maps validation file names to synsets.

    Two formats: one synset per line in sorted file-name order (the TPU reference's
    `imagenet_2012_validation_synset_labels.txt`), or lines `<filename> <synset>` / `<filename>,<synset>`
    (extra comma/space-separated fields are ignored, a CSV header line starting with `ImageId` is skipped).
    """
    with tf.io.gfile.GFile(path) as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    if lines and lines[0].lower().startswith(("imageid", "filename")):
        lines = lines[1:]
    rows = [ln.replace(",", " ").split() for ln in lines]
    if rows and all(len(r) == 1 for r in rows):
        if len(rows) != len(filenames):
            raise ValueError(
                f"Validation labels file {path!r} has {len(rows)} lines but the validation folder has "
                f"{len(filenames)} images; expected one synset per image in sorted file-name order."
            )
        return {f: r[0] for f, r in zip(filenames, rows)}
    mapping = {}
    for r in rows:
        stem = os.path.splitext(os.path.basename(r[0]))[0]
        mapping[stem] = r[1]
    out = {}
    for f in filenames:
        stem = os.path.splitext(f)[0]
        if stem not in mapping:
            raise ValueError(f"Validation image {f!r} has no entry in the labels file {path!r}.")
        out[f] = mapping[stem]
    return out


def _image_record_dataset(paths, labels):
    """tf.data pipeline: read each file, re-encode non-JPEG/CMYK to RGB JPEG, emit (bytes, shape, ok)."""

    def load(path, label):
        data = tf.io.read_file(path)
        is_jpeg = tf.strings.substr(data, 0, 2) == b"\xff\xd8"
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        # Keep grey/RGB JPEG bytes as they are (as the TPU converter does); re-encode PNG/BMP/GIF and CMYK
        # JPEGs to RGB JPEG. Channels of the stored JPEG come from its header.
        header_channels = tf.cond(is_jpeg, lambda: tf.io.extract_jpeg_shape(data)[2], lambda: tf.constant(0))
        keep = tf.logical_and(is_jpeg, tf.logical_or(header_channels == 1, header_channels == 3))
        encoded = tf.cond(keep, lambda: data, lambda: tf.io.encode_jpeg(image, quality=95))
        out_channels = tf.where(keep, header_channels, 3)
        return encoded, tf.shape(image)[:2], out_channels, label, path

    return tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


def convert_image_folder(
    source_dir,
    output_dir,
    split,
    num_shards,
    class_to_label=None,
    labels_file=None,
    synset_texts_file=None,
    shuffle_seed=0,
    progress=True,
):
    """Converts an ImageNet-layout folder to sharded ImageNet-format TFRecords (1-based labels).

    Two layouts:

    * training: `source_dir/<synset>/*.JPEG`; classes are the sorted sub-directory names, label = index + 1;
    * validation: `source_dir/*.JPEG` plus `labels_file` (one synset per line in sorted file order, or
      `<filename> <synset>` lines); labels come from `class_to_label` (from the training conversion).

    JPEG files are stored byte-for-byte; PNG/BMP/GIF are re-encoded to JPEG. Every file is decoded once to get
    its size and to prove it is readable. The file order is shuffled with `shuffle_seed` (so classes mix across
    shards, as in the TPU converter).

    Args:
      source_dir: str, the training or validation folder.
      output_dir: str, directory for the shards and the metadata JSON.
      split: str, e.g. "train" or "validation".
      num_shards: int > 0.
      class_to_label: optional dict synset -> 1-based label. Required for the validation layout; for the
        training layout it defaults to sorted sub-directories.
      labels_file: str, validation labels file (validation layout only).
      synset_texts_file: optional `synset_words.txt` (lines `<synset> <text>`) for `image/class/text`.
      shuffle_seed: int or None (keep sorted order). Default 0.
      progress: bool, progress bar on stderr. Default True.

    Returns:
      dict, the metadata written (see `write_sharded_records`), with `num_classes`, `synsets` (index k holds the
      synset of label k + 1), `class_names`, `class_to_label` and `label_offset` (1).

    Raises:
      FileNotFoundError: if `source_dir` (or `labels_file`) does not exist.
      ValueError: if `source_dir` holds no images, or a label is missing / out of range, or an image cannot be
        decoded (the message names the file).
    """
    if not tf.io.gfile.isdir(source_dir):
        raise FileNotFoundError(f"Source directory {source_dir!r} does not exist or is not a directory.")
    subdirs = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(source_dir) if tf.io.gfile.isdir(os.path.join(source_dir, d)))
    paths, synset_of = [], []
    if labels_file is None and subdirs:
        if class_to_label is None:
            class_to_label = {s: i + 1 for i, s in enumerate(subdirs)}
        for s in subdirs:
            if s not in class_to_label:
                raise ValueError(f"Class folder {os.path.join(source_dir, s)!r} is not in `class_to_label`.")
            for f in _list_images(os.path.join(source_dir, s)):
                paths.append(os.path.join(source_dir, s, f))
                synset_of.append(s)
    elif labels_file is not None:
        if not tf.io.gfile.exists(labels_file):
            raise FileNotFoundError(f"Validation labels file {labels_file!r} does not exist.")
        if class_to_label is None:
            raise ValueError("Argument `class_to_label` is required for a validation folder with `labels_file`.")
        files = _list_images(source_dir)
        mapping = _read_validation_labels(labels_file, files) if files else {}
        for f in files:
            paths.append(os.path.join(source_dir, f))
            synset_of.append(mapping[f])
    if not paths:
        raise ValueError(
            f"Source directory {source_dir!r} holds no images (expected `<synset>/*.JPEG` sub-folders, or "
            f"`*.JPEG` files with `labels_file`; extensions {IMAGE_EXTENSIONS})."
        )
    num_classes = len(class_to_label)
    labels = []
    for p, s in zip(paths, synset_of):
        if s not in class_to_label:
            raise ValueError(f"Image {p!r} has synset {s!r}, which is not a known class.")
        label = int(class_to_label[s])
        if not 1 <= label <= num_classes:
            raise ValueError(f"Image {p!r}: label {label} of synset {s!r} is out of range [1, {num_classes}].")
        labels.append(label)
    if shuffle_seed is not None:
        order = np.random.RandomState(shuffle_seed).permutation(len(paths))
        paths = [paths[i] for i in order]
        labels = [labels[i] for i in order]
    synsets = [s for s, _ in sorted(class_to_label.items(), key=lambda kv: kv[1])]
    texts = _read_synset_texts(synset_texts_file) if synset_texts_file else {}
    class_names = [texts.get(s, s) for s in synsets]

    def examples():
        it = iter(_image_record_dataset(paths, labels))
        for i in range(len(paths)):
            try:
                encoded, hw, channels, label, path = next(it)
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(f"Cannot decode image {paths[i]!r}: {e.message.splitlines()[0]}") from None
            k = int(label) - 1
            yield make_example(
                encoded.numpy(),
                int(label),
                int(hw[0]),
                int(hw[1]),
                int(channels),
                synset=synsets[k],
                text=class_names[k],
                filename=os.path.basename(path.numpy().decode()),
            ).SerializeToString()

    return write_sharded_records(
        examples(),
        output_dir,
        split,
        num_shards,
        num_examples=len(paths),
        metadata={
            "num_classes": num_classes,
            "synsets": synsets,
            "class_names": class_names,
            "class_to_label": dict(class_to_label),
            "label_offset": 1,
        },
        progress=progress,
    )
