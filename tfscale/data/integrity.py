"""Input integrity: why a record is skipped, damaged record files, and failing fast on unusable data.

Three guarantees of the input pipeline (`tfscale.data.imagenet_dataset`) rest on this module:

1. **Every skipped record has a reason.** `check_example` parses a serialized `tf.train.Example` with defaults for
   the two keys and returns a reason code (`SKIP_REASONS`) without running an op that can fail, so the known
   problems (a missing key, bytes that are not a JPEG, a label out of range, an image above the pixel limit, a
   header whose size the payload cannot hold) neither raise nor write a log line. Only data that reaches the JPEG
   decoder and breaks it ("corrupt record or JPEG data") is dropped by `ignore_errors()` and counted from the gap
   in the record numbering.
2. **No hang and no log flood on unusable data.** `FailFast` turns a stream whose first `records` records (or
   whose whole first pass) hold no usable example into one `InvalidArgumentError` whose message starts with
   `FAIL_FAST_MARKER` and names the file pattern, the most common reason and the key settings. Without it a
   repeated training stream of bad records never yields an element and the iterator spins forever.
3. **Damaged files are named.** `verify_record_files` walks the TFRecord framing of every file (lengths and their
   CRC-32C, no parsing) and reports each truncated or corrupt file with the number of records readable before the
   damage, and gzip-compressed files (which the pipeline, reading uncompressed TFRecords, would see as garbage).

Record-key presets (`KEY_PRESETS`): ``tpu`` = the TPU reference / Model Garden layout (``image/encoded``,
``image/class/label``, 1-based labels), ``tfds`` = TFDS ``imagenet2012`` (``image``, ``label``, 0-based labels).
"""

import collections
import dataclasses
import os
import struct

import tensorflow as tf

__all__ = [
    "FAIL_FAST_MARKER",
    "DEFAULT_FAIL_FAST_RECORDS",
    "DEFAULT_MAX_PIXELS_PER_BYTE",
    "KEY_PRESETS",
    "SKIP_REASONS",
    "DamagedRecordFileError",
    "RecordFileReport",
    "FailFast",
    "check_example",
    "explain_input_error",
    "verify_record_file",
    "verify_record_files",
]

#: Names of the reasons a record is skipped, indexed by the reason code (0 = usable).
SKIP_REASONS = (
    "usable",
    "missing image key",
    "missing label key",
    "image bytes are not a JPEG",
    "label out of range",
    "image above max_pixels",
    "image header larger than its data can hold",
    "corrupt record or JPEG data (the decoder failed)",
)
OK, MISSING_IMAGE, MISSING_LABEL, NOT_JPEG, LABEL_RANGE, TOO_MANY_PIXELS, IMPLAUSIBLE_HEADER, DECODE_FAILED = range(
    len(SKIP_REASONS))
#: Records of a stream (from its start) that may all be unusable before the pipeline stops with an error.
DEFAULT_FAIL_FAST_RECORDS = 1000
#: A baseline JPEG spends at least one bit on the DC coefficient of every 8x8 luma block, i.e. at most 512 pixels
#: per byte of entropy-coded data. A header claiming more than twice that (1,024 pixels per byte of the whole
#: file) cannot be honest: e.g. a 9000x9000 header on the few hundred bytes of a 28x28 image.
DEFAULT_MAX_PIXELS_PER_BYTE = 1024
#: Start of the error message of a stream with no usable example (train.py recognises it).
FAIL_FAST_MARKER = "tfscale: no usable example"
#: (image_key, label_key, label_offset) of the documented record layouts.
KEY_PRESETS = {
    "tpu": ("image/encoded", "image/class/label", 1),
    "tfds": ("image", "label", 0),
}
_MISSING_LABEL = -(2**62)  # default of the label feature: no stored label is this
_JPEG_MAGIC = b"\xff\xd8\xff"


def check_example(serialized, image_key, label_key, label_offset, num_classes, max_pixels,
                  max_pixels_per_byte=DEFAULT_MAX_PIXELS_PER_BYTE):
    """Parses one record and says whether it is usable, without an op that can fail on bad content.

    Args:
      serialized: string scalar tensor, a serialized `tf.train.Example`.
      image_key: str, feature key of the JPEG bytes.
      label_key: str, feature key of the int64 label.
      label_offset: int subtracted from the stored label.
      num_classes: int > 0 or None; labels outside `[0, num_classes)` (or negative) are unusable.
      max_pixels: int > 0, height * width above this is unusable.
      max_pixels_per_byte: int > 0 or None, header pixels per byte of the encoded image above this are
        unusable (see `DEFAULT_MAX_PIXELS_PER_BYTE`); None disables the check.

    Returns:
      `(image_bytes, label, reason)`: string scalar, int32 scalar (0-based), int32 reason code (index into
      `SKIP_REASONS`; 0 = usable). The JPEG header is read only when the earlier checks pass; a header too
      damaged to read still fails there (counted as `DECODE_FAILED` by the caller).
    """
    features = tf.io.parse_single_example(
        serialized,
        {
            image_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
            label_key: tf.io.FixedLenFeature([], tf.int64, default_value=_MISSING_LABEL),
        },
    )
    image_bytes = features[image_key]
    raw_label = features[label_key]
    label64 = raw_label - label_offset
    label = tf.cast(label64, tf.int32)
    in_range = label64 >= 0
    if num_classes is not None:
        in_range = tf.logical_and(in_range, label64 < num_classes)
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    # The first failing check gives the reason, branch-free (a `tf.case` would nest one conditional per check in
    # every record's map).
    reason = tf.constant(OK)
    for failed, code in reversed([
        (tf.equal(tf.strings.length(image_bytes), 0), MISSING_IMAGE),
        (tf.equal(raw_label, _MISSING_LABEL), MISSING_LABEL),
        (tf.logical_not(is_jpeg), NOT_JPEG),
        (tf.logical_not(in_range), LABEL_RANGE),
    ]):
        reason = tf.where(failed, code, reason)

    def header_reason():
        shape = tf.io.extract_jpeg_shape(image_bytes, output_type=tf.int64)
        pixels = shape[0] * shape[1]
        too_big = pixels > max_pixels
        if max_pixels_per_byte is None:
            implausible = tf.constant(False)
        else:
            size = tf.cast(tf.strings.length(image_bytes), tf.int64)
            implausible = pixels > size * max_pixels_per_byte
        return tf.where(too_big, TOO_MANY_PIXELS, tf.where(implausible, IMPLAUSIBLE_HEADER, OK))

    reason = tf.cond(tf.equal(reason, OK), header_reason, lambda: reason)
    return image_bytes, label, tf.cast(reason, tf.int32)


class FailFast:
    """The state and check of a `Dataset.scan` that stops a stream with no usable example.

    The scan sees every element that was not dropped by `ignore_errors()`, numbered in stream order: usable
    records, records with a known skip reason, and the end-of-pass sentinel. Its state is `(previous index,
    usable count, count per reason)`; records dropped by the decoder show as gaps in the numbering
    (`DECODE_FAILED`). The stream fails when no usable example came and either `records` records have gone by or
    a whole pass (a sentinel) has.

    Args:
      records: int > 0 or None, see `DEFAULT_FAIL_FAST_RECORDS`; None keeps only the whole-pass check.
      description: str, the settings named in the error (file pattern, keys, label offset).
    """

    def __init__(self, records, description):
        if records is not None and (isinstance(records, bool) or not isinstance(records, int) or records <= 0):
            raise ValueError(f"Argument `fail_fast_records` must be an int > 0 or None. "
                             f"Received: fail_fast_records={records!r}")
        self.records = records
        self.description = description

    def initial_state(self):
        """The scan's initial state."""
        return (tf.constant(-1, tf.int64), tf.constant(0, tf.int64), tf.zeros([len(SKIP_REASONS)], tf.int64))

    def step(self, state, index, reason, is_sentinel):
        """Advances the state by one element; returns `(new_state, gap)`, where `gap` (int64) is the number of
        records dropped by the decoder just before this one. Raises (at run time) when the stream is unusable."""
        previous, usable, by_reason = state
        gap = index - previous - 1
        is_record = tf.logical_not(is_sentinel)
        one_hot = tf.one_hot(reason, len(SKIP_REASONS), dtype=tf.int64) * tf.cast(is_record, tf.int64)
        by_reason = by_reason + one_hot + tf.one_hot(DECODE_FAILED, len(SKIP_REASONS), dtype=tf.int64) * gap
        usable = usable + tf.cast(tf.logical_and(is_record, tf.equal(reason, OK)), tf.int64)
        seen = tf.reduce_sum(by_reason)  # records so far (reason 0 included)
        failing = tf.logical_and(tf.equal(usable, 0), seen > 0)
        limit_hit = is_sentinel if self.records is None else tf.logical_or(is_sentinel, seen >= self.records)
        failing = tf.logical_and(failing, limit_hit)

        def message():
            common = tf.argmax(by_reason[1:], output_type=tf.int32) + 1
            reason_text = tf.gather(tf.constant(SKIP_REASONS), common)
            scope = tf.where(is_sentinel, "a whole pass over the files (", "the first ")
            tail = tf.where(is_sentinel, " records read so far)", " records")
            return tf.strings.join([
                FAIL_FAST_MARKER, ": ", scope, tf.strings.as_string(seen), tail, " yielded no usable example; "
                "most common reason: ", reason_text, " (", tf.strings.as_string(tf.gather(by_reason, common)),
                " records). ", self.description,
            ])

        check = tf.debugging.Assert(tf.logical_not(failing), [tf.cond(failing, message, lambda: "")],
                                    summarize=1)
        with tf.control_dependencies([check]):
            gap = tf.identity(gap)
        return (index, usable, by_reason), gap


@dataclasses.dataclass(frozen=True)
class RecordFileReport:
    """What `verify_record_file` found in one file.

    Attributes:
      path: str, the file.
      num_records: int, whole records readable from the start (before any damage).
      problem: None for an intact file, else a str: what is wrong and at which byte offset.
    """

    path: str
    num_records: int
    problem: object = None


class DamagedRecordFileError(ValueError):
    """One or more TFRecord files are truncated, corrupt or compressed (the message names each)."""


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def verify_record_file(path):
    """Walks the framing of one uncompressed TFRecord file (lengths and their CRC-32C; the payloads are skipped).

    Args:
      path: str, a local file path.

    Returns:
      A `RecordFileReport`. `problem` is set for a gzip- or zlib-compressed file ("GZIP-compressed"), a bad
      length CRC (corrupt) or a record that runs past the end of the file (truncated).
    """
    size = os.path.getsize(path)
    count, offset = 0, 0
    with open(path, "rb") as f:
        head = f.read(2)
        if head == b"\x1f\x8b":
            return RecordFileReport(path, 0, "GZIP-compressed (tfscale reads uncompressed TFRecord files; "
                                             "decompress it, e.g. `gunzip`, or rewrite it uncompressed)")
        f.seek(0)
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                return RecordFileReport(path, count, f"truncated: a partial record header at byte {offset} "
                                                     f"of {size}")
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if _masked_crc32c(header[:8]) != length_crc:
                what = "ZLIB-compressed or corrupt" if count == 0 and header[0] == 0x78 else "corrupt"
                return RecordFileReport(path, count, f"{what}: bad length checksum at byte {offset}")
            end = offset + 12 + length + 4
            if end > size:
                return RecordFileReport(path, count, f"truncated: the record at byte {offset} needs "
                                                     f"{end - size} bytes more than the file's {size}")
            offset = end
            f.seek(offset)
            count += 1
    return RecordFileReport(path, count, None)


def verify_record_files(file_pattern_or_files):
    """Runs `verify_record_file` on every file matching a glob pattern (or in a list).

    Returns:
      A list of `RecordFileReport`, sorted by path.

    Raises:
      ValueError: if no file matches.
    """
    from tfscale.data import records

    return [verify_record_file(path) for path in records._match_files(file_pattern_or_files)]


def describe_damage(reports):
    """One line per damaged file: ``path: problem; N records readable before the damage``."""
    return [f"{r.path}: {r.problem}; {r.num_records} records readable before the damage"
            for r in reports if r.problem]


def most_common_reason(counts):
    """Returns the most frequent name in a {reason: count} mapping, or None when it is empty."""
    return collections.Counter(counts).most_common(1)[0][0] if counts else None


def explain_input_error(error):
    """Returns the fail-fast message inside a TensorFlow error raised by iterating a pipeline, or None.

    Args:
      error: an exception (typically `tf.errors.InvalidArgumentError` from `model.fit` or `next(iterator)`).

    Returns:
      str starting with `FAIL_FAST_MARKER` (without TensorFlow's node and op decorations), or None when the error
      is not a fail-fast error.
    """
    text = str(error)
    start = text.find(FAIL_FAST_MARKER)
    if start < 0:
        return None
    end = text.find("]", start)
    return text[start:end if end > 0 else None].strip()
