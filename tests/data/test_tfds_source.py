"""TFDS as a data source (issue 16), offline: a small TFDS data set built on disk from local JPEG files by a
builder defined here, read by tfscale's pipeline, converted to tfscale records, and trained on by scripts/train.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

tfds = pytest.importorskip("tensorflow_datasets")

from etils import epath  # noqa: E402  (a dependency of tensorflow-datasets)

from tfscale.data import pipeline  # noqa: E402
from tfscale.data import records  # noqa: E402
from tfscale.data import tfds_source  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: One solid colour per class: any crop of an image keeps its class's colour, so labels can be checked on pixels.
COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 220], [220, 220, 40]], np.uint8)
CLASS_NAMES = ["red", "green", "blue", "yellow"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2


class TfscaleTinyPhotos(tfds.core.GeneratorBasedBuilder):
    """4 classes of solid-colour JPEG files from a local folder (set `source_dir` on the class before preparing)."""

    VERSION = tfds.core.Version("1.0.0")
    source_dir = None

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split):
        folder = os.path.join(self.source_dir, split)
        for class_name in sorted(os.listdir(folder)):
            for fname in sorted(os.listdir(os.path.join(folder, class_name))):
                path = os.path.join(folder, class_name, fname)
                yield f"{class_name}/{fname}", {"image": path, "label": class_name, "file_name": fname}


def _write_local_jpegs(root):
    """JPEG files <root>/<split>/<class>/<class>_<i>.jpg of varied sizes; returns {file name: label}."""
    rng = np.random.RandomState(0)
    labels = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASS_NAMES):
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                h, w = rng.randint(40, 72), rng.randint(40, 72)
                image = np.broadcast_to(COLOURS[label], (h, w, 3)).copy()
                fname = f"{name}_{split}_{i}.jpg"
                tf.io.write_file(os.path.join(root, split, name, fname), tf.io.encode_jpeg(image, quality=95))
                labels[fname] = label
    return labels


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """The prepared TFDS data set: returns (name, data_dir, {file name: label})."""
    root = tmp_path_factory.mktemp("tfds")
    labels = _write_local_jpegs(str(root / "source"))
    TfscaleTinyPhotos.source_dir = str(root / "source")
    # TFDS reads README/citation files from a builder's package directory; this test module is in none.
    (root / "pkg").mkdir()
    TfscaleTinyPhotos.pkg_dir_path = epath.Path(str(root / "pkg"))
    data_dir = str(root / "tensorflow_datasets")
    builder = TfscaleTinyPhotos(data_dir=data_dir)
    builder.download_and_prepare(download_dir=str(root / "downloads"))
    return builder.name, data_dir, labels


def _class_of(images):
    """The class whose colour is nearest to each image's mean colour (images: [n, h, w, 3] pixels 0..255)."""
    means = np.asarray(images, np.float32).reshape(len(images), -1, 3).mean(axis=1)
    return np.argmin(((means[:, None, :] - COLOURS[None].astype(np.float32)) ** 2).sum(-1), axis=1)


def test_tfds_info_from_the_builder(tiny_tfds):
    name, data_dir, _ = tiny_tfds
    info = tfds_source.tfds_info(name, data_dir)
    assert info["num_classes"] == 4 and info["class_names"] == CLASS_NAMES
    assert info["num_train_examples"] == 4 * TRAIN_PER_CLASS and info["num_eval_examples"] == 4 * TEST_PER_CLASS
    assert info["eval_split"] == "test" and (info["image_key"], info["label_key"]) == ("image", "label")
    assert info["image_encoding"] == "jpeg" and info["file_format"] == "tfrecord"
    with pytest.raises(ValueError, match="no split 'nope'"):
        tfds_source.tfds_info(name, data_dir, train_split="nope")
    with pytest.raises(ValueError, match="not found|not prepared"):
        tfds_source.tfds_info("tfscale_no_such_set", data_dir)


@pytest.mark.parametrize("reader", ["files", "as_dataset"])
def test_labels_match_the_files(tiny_tfds, reader):
    name, data_dir, labels = tiny_tfds
    # Evaluation: every test image once, labels equal to the files' classes (checked on the pixels too).
    ds = tfds_source.tfds_dataset(name, "test", False, 32, 3, data_dir=data_dir, reader=reader, dtype="uint8")
    images, got = [], []
    for x, y in ds:
        assert x.dtype == tf.uint8 and x.shape[1:] == (32, 32, 3)
        images.append(x.numpy())
        got.append(y.numpy())
    images, got = np.concatenate(images), np.concatenate(got)
    expected = sorted(v for k, v in labels.items() if "_test_" in k)
    assert sorted(got) == expected
    np.testing.assert_array_equal(_class_of(images), got)
    # Training: random crops of the fused decode-and-crop, labels still right.
    train = tfds_source.tfds_dataset(name, "train", True, 24, 8, data_dir=data_dir, reader=reader, dtype="uint8",
                                     seed=3, shuffle_buffer_size=24)
    for x, y in train.take(4):
        np.testing.assert_array_equal(_class_of(x.numpy()), y.numpy())


def test_shards_per_input_pipeline_and_counted_skips(tiny_tfds):
    name, data_dir, _ = tiny_tfds
    seen = []
    counter = pipeline.SkippedRecordCounter()
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid)
        with pytest.warns(UserWarning):  # one shard per split: falls back to record sharding
            ds = tfds_source.tfds_dataset(name, "train", False, 16, 4, input_context=ctx, data_dir=data_dir,
                                          skip_counter=counter)
        seen.append(np.concatenate([y.numpy() for _, y in ds]))
    assert sorted(np.concatenate(seen)) == sorted(list(range(4)) * TRAIN_PER_CLASS)
    assert counter.result() == 0


def test_png_data_sets_are_refused_with_the_fix(tiny_tfds, monkeypatch):
    name, data_dir, _ = tiny_tfds
    real = tfds_source.tfds_info
    monkeypatch.setattr(tfds_source, "tfds_info", lambda *a, **k: dict(real(*a, **k), image_encoding="png"))
    with pytest.raises(ValueError, match="build_tfrecords.py --source=tfds:"):
        tfds_source.tfds_dataset(name, "train", True, 16, 4, data_dir=data_dir)


def test_convert_tfds_to_tfscale_records(tiny_tfds, tmp_path):
    name, data_dir, labels = tiny_tfds
    out = str(tmp_path / "records")
    meta = tfds_source.convert_tfds(name, out, "test", "validation", 2, data_dir=data_dir, progress=False)
    assert meta["num_examples"] == 4 * TEST_PER_CLASS
    assert records.read_metadata(out, "validation")["class_names"] == CLASS_NAMES
    for serialized in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(os.path.join(out, "validation-*")))):
        example = tf.train.Example.FromString(serialized.numpy())
        feature = example.features.feature
        fname = feature[records.FILENAME_KEY].bytes_list.value[0].decode()
        assert feature[records.LABEL_KEY].int64_list.value[0] == labels[fname] + 1  # 1-based in tfscale records
        assert feature[records.SYNSET_KEY].bytes_list.value[0].decode() == CLASS_NAMES[labels[fname]]


@pytest.mark.slow
def test_train_py_two_steps_from_tfds(tiny_tfds, tmp_path):
    name, data_dir, _ = tiny_tfds
    model_dir = str(tmp_path / "run")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "train.py"), f"--dataset=tfds:{name}",
         f"--tfds_data_dir={data_dir}", f"--model_dir={model_dir}", "--model=resnet8", "--image_size=24",
         "--num_replicas=2", "--global_batch_size=8", "--epochs=1", "--steps_per_epoch=2", "--warmup_epochs=0", "--cache",
         "--min_crop_area=0.5"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(model_dir, "results.json")) as f:
        results = json.load(f)
    assert results["num_classes"] == 4 and results["num_train_examples"] == 4 * TRAIN_PER_CLASS
    assert results["num_evaluated"] == 4 * TEST_PER_CLASS and results["skipped_records"] == 0
    assert results["epochs_run"] == [0]


def test_build_tfrecords_script_converts_a_tfds_data_set(tiny_tfds, tmp_path):
    import importlib.util
    import types

    name, data_dir, _ = tiny_tfds
    spec = importlib.util.spec_from_file_location("build_tfrecords", os.path.join(REPO, "scripts", "build_tfrecords.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    out = str(tmp_path / "converted")
    result = build.run(types.SimpleNamespace(
        source=f"tfds:{name}", tfds_data_dir=data_dir, tfds_train_split="train", tfds_eval_split=None,
        output_dir=out, num_shards=2, eval_num_shards=1, progress=False))
    assert result["train"]["num_examples"] == 4 * TRAIN_PER_CLASS
    assert result["validation"]["num_examples"] == 4 * TEST_PER_CLASS
    # tfscale's own reader (1-based ImageNet-format records) gives back the TFDS labels, matching the pixels.
    x, y = _epoch_of(pipeline.imagenet_dataset(os.path.join(out, "validation-*"), False, 16, 4, dtype="uint8"))
    assert sorted(y) == sorted(list(range(4)) * TEST_PER_CLASS)
    np.testing.assert_array_equal(_class_of(x), y)
    with pytest.raises(ValueError, match="--source"):
        build.run(types.SimpleNamespace(source="tfds", output_dir=out, eval_num_shards=None, num_shards=1))


def _epoch_of(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)
