"""Tests of tfscale.data.fashion_mnist: IDX reading, one-time conversion and reuse, clear errors."""

import glob
import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from tfscale.data import fashion_mnist
from tfscale.data import pipeline
from tfscale.data import records


def _write_idx(path, array):
    header = [2051 if array.ndim == 3 else 2049, array.shape[0], *array.shape[1:]]
    with gzip.open(path, "wb") as fh:
        fh.write(np.array(header, dtype=">u4").tobytes() + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_source(tmp_path):
    """A Fashion-MNIST-shaped source dir: 40 train and 20 test images with structured content."""
    rng = np.random.RandomState(0)
    src = tmp_path / "src"
    src.mkdir()
    arrays = {}
    for split, n, (img_name, lbl_name) in (("train", 40, fashion_mnist._FILES["train"]),
                                           ("validation", 20, fashion_mnist._FILES["validation"])):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        for i, k in enumerate(labels):  # a bright bar whose row encodes the class
            images[i, 2 + 2 * k : 4 + 2 * k, 4:24] = 200 + rng.randint(0, 50)
        _write_idx(src / img_name, images)
        _write_idx(src / lbl_name, labels)
        arrays[split] = (images, labels)
    return str(src), arrays


def test_read_idx_matches_written_arrays(tiny_source):
    src, arrays = tiny_source
    images, labels = fashion_mnist.load_arrays(src, "train")
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(np.array([1234, 1], ">u4").tobytes())
    with pytest.raises(ValueError, match="magic 1234"):
        fashion_mnist.read_idx(str(bad))
    with gzip.open(bad, "wb") as fh:
        fh.write(np.array([2049, 5], ">u4").tobytes() + b"\x01\x02")
    with pytest.raises(ValueError, match="expected 5"):
        fashion_mnist.read_idx(str(bad))


def test_prepare_records_converts_once_and_reuses(tiny_source, tmp_path):
    src, arrays = tiny_source
    out = str(tmp_path / "records")
    info = fashion_mnist.prepare_records(out, source_dir=src, num_shards=4, eval_num_shards=2, progress=False)
    assert info["converted"] and info["num_train_examples"] == 40 and info["num_eval_examples"] == 20
    assert info["num_classes"] == 10 and info["class_names"][9] == "Ankle boot"
    assert records.count_records(info["train_file_pattern"]) == 40
    first = records.parse_example(
        next(iter(tf.data.TFRecordDataset(sorted(glob.glob(info["eval_file_pattern"]))))).numpy()
    )
    assert first[records.CHANNELS_KEY] == 1 and first[records.LABEL_KEY] == 1  # test image 0 has class 0
    assert first[records.SYNSET_KEY] == b"tshirt_top" and first[records.TEXT_KEY] == b"T-shirt/top"
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    again = fashion_mnist.prepare_records(out, source_dir="/nonexistent", num_shards=4, progress=False)
    assert not again["converted"] and again["num_train_examples"] == 40
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == mtimes
    # Through the pipeline: 28x28 grey JPEGs come out as 3 equal channels with 0-based labels.
    ds = pipeline.imagenet_dataset(
        info["eval_file_pattern"], False, 28, 20, central_fraction=1.0, mean=(0, 0, 0), stddev=(1, 1, 1)
    )
    x, y = next(iter(ds))
    images, labels = arrays["validation"]
    np.testing.assert_array_equal(np.sort(y.numpy()), np.sort(labels))
    x = x.numpy()
    np.testing.assert_allclose(x[..., 0], x[..., 2], atol=1e-6)
    for xi, yi in zip(x, y.numpy()):
        bar_row = 2 + 2 * yi
        away = np.r_[0 : max(bar_row - 2, 0), bar_row + 4 : 28]
        assert xi[bar_row : bar_row + 2, 6:22, 0].mean() > 0.6 and xi[away, :, 0].mean() < 0.05


def test_missing_source_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.prepare_records(str(tmp_path / "out"), source_dir=str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []
    with pytest.raises(ValueError, match="num_shards=0"):
        fashion_mnist.prepare_records(str(tmp_path / "out"), num_shards=0)


@pytest.mark.skipif(not fashion_mnist.source_available(), reason="dataset-fashion-mnist is not installed")
def test_debian_package_files_have_the_documented_shapes():
    images, labels = fashion_mnist.load_arrays(split="validation")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
