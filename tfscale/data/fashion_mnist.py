"""The embedded default data set: Fashion-MNIST from Debian's `dataset-fashion-mnist`, as ImageNet-format TFRecords.

Fashion-MNIST (Xiao, Rasul, Vollgraf, arXiv:1708.07747; MIT licence) has 60,000 training and 10,000 test images,
28x28 grey, 10 classes. Debian ships it as four gzipped IDX files in `/usr/share/datasets/fashion-mnist`
(`apt-get install -y dataset-fashion-mnist`). `prepare_records` converts them once into ImageNet-format TFRecords
(JPEG, 1-based labels, synset/text names of the classes; see `tfscale.data.records`), so training reads them through
the same `imagenet_dataset` code path as real ImageNet; a second call finds the metadata files and reuses them.
"""

import gzip
import os

import numpy as np

from tfscale.data import records

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"

#: Class names in label order (label k is stored as k + 1 in the records).
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Synset-like ids stored as `image/class/synset`.
SYNSETS = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
IMAGE_SIZE = 28
NUM_CLASSES = 10
TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"

_FILES = {
    TRAIN_SPLIT: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    EVAL_SPLIT: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def read_idx(path):
    """Reads a (gzipped) IDX file of unsigned bytes: images `[N, rows, cols]` or labels `[N]`.

    The IDX format has a big-endian header: magic (2051 for images, 2049 for labels), the count, then rows and
    columns for images; 16 header bytes for images, 8 for labels.

    Args:
      path: str, path to an `.gz` or uncompressed IDX file.

    Returns:
      uint8 numpy array, `[N, rows, cols]` (images) or `[N]` (labels).

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: if the file is not a uint8 IDX file of images or labels, or is truncated.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"Cannot read IDX file {path!r}: {e}") from None
    if len(data) < 8:
        raise ValueError(f"IDX file {path!r} is too short ({len(data)} bytes).")
    magic, count = np.frombuffer(data[:8], dtype=">u4")
    if magic == _IMAGES_MAGIC:
        rows, cols = np.frombuffer(data[8:16], dtype=">u4")
        shape, offset = (int(count), int(rows), int(cols)), 16
    elif magic == _LABELS_MAGIC:
        shape, offset = (int(count),), 8
    else:
        raise ValueError(f"IDX file {path!r} has magic {magic}; expected {_IMAGES_MAGIC} or {_LABELS_MAGIC}.")
    size = int(np.prod(shape))
    if len(data) - offset != size:
        raise ValueError(f"IDX file {path!r} holds {len(data) - offset} bytes of data; expected {size} for {shape}.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_arrays(source_dir=DEFAULT_SOURCE_DIR, split=TRAIN_SPLIT):
    """Loads one split of Fashion-MNIST from the Debian package's IDX files.

    Args:
      source_dir: str, directory with the four `*-ubyte.gz` files. Default `/usr/share/datasets/fashion-mnist`.
      split: "train" (60,000 images) or "validation" (the 10,000 test images).

    Returns:
      (images uint8 `[N, 28, 28]`, labels uint8 `[N]`, 0-based).

    Raises:
      FileNotFoundError: if the directory or a file is missing; the message gives the `apt-get` command.
      ValueError: for an unknown split or a malformed file.
    """
    if split not in _FILES:
        raise ValueError(f"Argument `split` must be one of {list(_FILES)}. Received: split={split!r}")
    paths = [os.path.join(source_dir, name) for name in _FILES[split]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {source_dir!r} (missing {', '.join(os.path.basename(p) for p in missing)}). "
            f"Install it with `{INSTALL_HINT}` or pass the directory holding the IDX files."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split} files in {source_dir!r} do not match: images {images.shape}, labels {labels.shape}."
        )
    return images, labels


def prepare_records(data_dir, source_dir=DEFAULT_SOURCE_DIR, num_shards=8, eval_num_shards=None, progress=True):
    """Converts Fashion-MNIST to ImageNet-format TFRecords in `data_dir` once, and describes them.

    If `data_dir` already holds the metadata of both splits (a finished earlier conversion), nothing is
    rewritten and the existing records are described (whatever `num_shards` they were written with).
    Converting the 70,000 images takes about 10 s on 2 cores.

    Args:
      data_dir: str, output directory for `train-*-of-*`, `validation-*-of-*` and their metadata JSON.
      source_dir: str, directory of the gzipped IDX files. Default `/usr/share/datasets/fashion-mnist`.
      num_shards: int > 0, training shards. Default 8 (at least the number of input pipelines you will use).
      eval_num_shards: int > 0, evaluation shards; default `num_shards`.
      progress: bool, progress bar on stderr. Default True.

    Returns:
      dict with `train_file_pattern`, `eval_file_pattern` (str globs), `num_train_examples` (60000),
      `num_eval_examples` (10000), `num_classes` (10), `class_names`, `image_size` (28), `label_offset` (1) and
      `converted` (bool: False when existing records were reused).

    Raises:
      FileNotFoundError: if `source_dir` lacks the IDX files (the message gives the `apt-get` fix).
      ValueError: for bad `num_shards` or malformed source files.
    """
    eval_num_shards = num_shards if eval_num_shards is None else eval_num_shards
    records.shard_names(TRAIN_SPLIT, num_shards)  # validates num_shards
    records.shard_names(EVAL_SPLIT, eval_num_shards)
    infos = {s: records.read_metadata(data_dir, s) for s in (TRAIN_SPLIT, EVAL_SPLIT)}
    converted = False
    for split, shards in ((TRAIN_SPLIT, num_shards), (EVAL_SPLIT, eval_num_shards)):
        if infos[split] is None:
            images, labels = load_arrays(source_dir, split)
            infos[split] = records.convert_arrays(
                images,
                labels,
                data_dir,
                split,
                shards,
                class_names=list(CLASS_NAMES),
                synsets=list(SYNSETS),
                label_offset=1,
                filename_prefix=f"fashion_mnist_{split}",
                progress=progress,
            )
            converted = True
    return {
        "train_file_pattern": records.file_pattern(data_dir, TRAIN_SPLIT),
        "eval_file_pattern": records.file_pattern(data_dir, EVAL_SPLIT),
        "num_train_examples": int(infos[TRAIN_SPLIT]["num_examples"]),
        "num_eval_examples": int(infos[EVAL_SPLIT]["num_examples"]),
        "num_classes": int(infos[TRAIN_SPLIT].get("num_classes", NUM_CLASSES)),
        "class_names": list(infos[TRAIN_SPLIT].get("class_names", CLASS_NAMES)),
        "image_size": IMAGE_SIZE,
        "label_offset": 1,
        "converted": converted,
    }


def source_available(source_dir=DEFAULT_SOURCE_DIR):
    """Returns True when the four Fashion-MNIST IDX files exist in `source_dir`."""
    return all(os.path.isfile(os.path.join(source_dir, n)) for pair in _FILES.values() for n in pair)

