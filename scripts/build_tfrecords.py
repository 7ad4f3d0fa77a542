"""Converts image data to sharded ImageNet-format TFRecords (TPU / Model Garden keys, 1-based labels).

Three sources:

* `--source=fashion_mnist` (default): the gzipped IDX files of Debian's `dataset-fashion-mnist`
  (`--source_dir`, default `/usr/share/datasets/fashion-mnist`) -> `train-*` and `validation-*` shards;
* `--source=imagenet`: an ImageNet folder, `<source_dir>/<train_subdir>/<synset>/*.JPEG` and
  `<source_dir>/<validation_subdir>/*.JPEG` with `--validation_labels_file` (one synset per line in sorted file
  order, or `<filename> <synset>` lines); `--synset_texts_file` (`synset_words.txt`) adds class names;
* `--source=tfds:<name>`: a prepared TFDS image-classification data set in `--tfds_data_dir` (its training split ->
  `train-*`, its validation or test split -> `validation-*`; JPEG bytes copied, other encodings re-encoded as JPEG,
  labels stored 1-based, class names from the builder). Nothing is downloaded.

Shards are written under temporary names and renamed when complete, with a progress bar; a
`<split>.metadata.json` next to them records the counts and class names (`tfscale.data.count_records` reads it).

Example:
  python scripts/build_tfrecords.py --output_dir=/tmp/fmnist_records --num_shards=8
  python scripts/build_tfrecords.py --source=imagenet --source_dir=/data/imagenet --output_dir=/data/records \
      --validation_labels_file=/data/imagenet/val_labels.txt --num_shards=1024 --eval_num_shards=128
  python scripts/build_tfrecords.py --source=tfds:imagenet2012 --tfds_data_dir=~/tensorflow_datasets \
      --output_dir=/data/records --num_shards=1024 --eval_num_shards=128
"""

import json
import os

from absl import app
from absl import flags

from tfscale.data import fashion_mnist
from tfscale.data import records

SOURCES = ("fashion_mnist", "imagenet")


def define_flags():
    """Defines the command-line flags of this script."""
    flags.DEFINE_string("source", "fashion_mnist", "What to convert: fashion_mnist, imagenet or tfds:<name>.")
    flags.DEFINE_string("tfds_data_dir", None, "tfds:<name>: the TFDS data directory (default: TFDS's).")
    flags.DEFINE_string("tfds_train_split", "train", "tfds:<name>: the split converted to train-*.")
    flags.DEFINE_string("tfds_eval_split", None, "tfds:<name>: the split converted to validation-* (default: "
                        "validation, else test).")
    flags.DEFINE_string(
        "source_dir", None, "Source directory (default: /usr/share/datasets/fashion-mnist for fashion_mnist)."
    )
    flags.DEFINE_string("output_dir", None, "Directory for the shards and metadata (required).")
    flags.DEFINE_integer("num_shards", 8, "Number of training shards (>= the number of input pipelines).")
    flags.DEFINE_integer("eval_num_shards", None, "Number of validation shards (default: --num_shards).")
    flags.DEFINE_string("train_subdir", "train", "imagenet: training sub-folder of --source_dir.")
    flags.DEFINE_string("validation_subdir", "validation", "imagenet: validation sub-folder of --source_dir.")
    flags.DEFINE_string("validation_labels_file", None, "imagenet: validation labels file (skip validation if unset).")
    flags.DEFINE_string("synset_texts_file", None, "imagenet: optional synset_words.txt with class names.")
    flags.DEFINE_bool("progress", True, "Draw a progress bar on stderr.")


def run(flags_obj):
    """Runs the conversion.

    Args:
      flags_obj: the parsed `absl.flags.FLAGS`.

    Returns:
      dict: per split, the metadata written (`num_examples`, `num_shards`, `file_pattern`, class names ...), and
      `output_dir`.

    Raises:
      ValueError: if `--output_dir` is missing or the source is empty/unreadable (the message names it).
      FileNotFoundError: if the source directory does not exist.
    """
    if not flags_obj.output_dir:
        raise ValueError("Flag `--output_dir` is required. Received: --output_dir=None")
    eval_shards = flags_obj.eval_num_shards or flags_obj.num_shards
    out = {"output_dir": flags_obj.output_dir}
    if flags_obj.source.startswith("tfds:"):
        from tfscale.data import tfds_source

        name = tfds_source.parse_tfds_name(flags_obj.source)
        info = tfds_source.tfds_info(name, flags_obj.tfds_data_dir, train_split=flags_obj.tfds_train_split,
                                     eval_split=flags_obj.tfds_eval_split)
        for split, output_split, shards in ((info["train_split"], "train", flags_obj.num_shards),
                                            (info["eval_split"], "validation", eval_shards)):
            out[output_split] = tfds_source.convert_tfds(name, flags_obj.output_dir, split, output_split, shards,
                                                         data_dir=flags_obj.tfds_data_dir,
                                                         progress=flags_obj.progress)
        return out
    if flags_obj.source not in SOURCES:
        raise ValueError(f"Flag `--source` must be one of {list(SOURCES)} or tfds:<name>. Received: "
                         f"--source={flags_obj.source!r}")
    if flags_obj.source == "fashion_mnist":
        info = fashion_mnist.prepare_records(
            flags_obj.output_dir,
            source_dir=flags_obj.source_dir or fashion_mnist.DEFAULT_SOURCE_DIR,
            num_shards=flags_obj.num_shards,
            eval_num_shards=eval_shards,
            progress=flags_obj.progress,
        )
        for split in (fashion_mnist.TRAIN_SPLIT, fashion_mnist.EVAL_SPLIT):
            out[split] = records.read_metadata(flags_obj.output_dir, split)
        out["converted"] = info["converted"]
        return out
    if not flags_obj.source_dir:
        raise ValueError("Flag `--source_dir` is required for --source=imagenet. Received: --source_dir=None")
    train = records.convert_image_folder(
        os.path.join(flags_obj.source_dir, flags_obj.train_subdir),
        flags_obj.output_dir,
        "train",
        flags_obj.num_shards,
        synset_texts_file=flags_obj.synset_texts_file,
        progress=flags_obj.progress,
    )
    out["train"] = train
    if flags_obj.validation_labels_file:
        out["validation"] = records.convert_image_folder(
            os.path.join(flags_obj.source_dir, flags_obj.validation_subdir),
            flags_obj.output_dir,
            "validation",
            eval_shards,
            class_to_label=train["class_to_label"],
            labels_file=flags_obj.validation_labels_file,
            synset_texts_file=flags_obj.synset_texts_file,
            progress=flags_obj.progress,
        )
    return out


def main(_):
    result = run(flags.FLAGS)
    summary = {k: (v["num_examples"] if isinstance(v, dict) else v) for k, v in result.items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
