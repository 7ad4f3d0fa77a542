"""Tests of tfscale.data.records: keys, round trip, atomic sharding, counting, converters (incl. real photos)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from datahelpers import smooth_images
from tfscale.data import records


def _read_all(pattern):
    files = sorted(tf.io.gfile.glob(pattern))
    return [records.parse_example(r.numpy()) for r in tf.data.TFRecordDataset(files)]


def test_round_trip_keys_labels_and_pixels(tmp_path):
    images = smooth_images(12, 30, 20)
    labels = np.arange(12) % 3
    info = records.convert_arrays(
        images, labels, str(tmp_path), "train", 3, class_names=["a", "b", "c"], synsets=["n1", "n2", "n3"],
        progress=False,
    )
    assert info["num_examples"] == 12 and info["num_classes"] == 3
    assert sorted(os.listdir(tmp_path)) == [
        "train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003", "train.metadata.json"
    ]
    parsed = _read_all(info["file_pattern"])
    assert len(parsed) == 12
    expected_keys = {
        records.ENCODED_KEY, records.FORMAT_KEY, records.LABEL_KEY, records.SYNSET_KEY, records.TEXT_KEY,
        records.FILENAME_KEY, records.HEIGHT_KEY, records.WIDTH_KEY, records.CHANNELS_KEY, records.COLORSPACE_KEY,
    }
    for ex in parsed:
        assert set(ex) == expected_keys
        i = int(ex[records.FILENAME_KEY].decode().split("_")[-1].split(".")[0])
        # 1-based label in the file, synset/text of its class.
        assert ex[records.LABEL_KEY] == labels[i] + 1
        assert ex[records.SYNSET_KEY] == f"n{labels[i] + 1}".encode()
        assert ex[records.TEXT_KEY] == "abc"[labels[i]].encode()
        assert (ex[records.HEIGHT_KEY], ex[records.WIDTH_KEY], ex[records.CHANNELS_KEY]) == (30, 20, 3)
        assert ex[records.FORMAT_KEY] == b"JPEG"
        decoded = tf.io.decode_jpeg(ex[records.ENCODED_KEY]).numpy().astype(int)
        assert decoded.shape == (30, 20, 3)
        # Within JPEG error (quality 95, no chroma subsampling, smooth images).
        assert np.abs(decoded - images[i]).mean() < 2.0
        assert np.abs(decoded - images[i]).max() <= 16


def test_grey_arrays_are_stored_with_one_channel(tmp_path):
    images = smooth_images(4, 28, 28)[..., 0]
    info = records.convert_arrays(images, np.zeros(4, int), str(tmp_path), "train", 1, progress=False)
    ex = _read_all(info["file_pattern"])[0]
    assert ex[records.CHANNELS_KEY] == 1 and ex[records.COLORSPACE_KEY] == b"Grayscale"


def test_count_records_from_metadata_and_by_scanning(tmp_path):
    info = records.convert_arrays(smooth_images(7, 8, 8), np.arange(7), str(tmp_path), "train", 2, progress=False)
    assert records.count_records(info["file_pattern"]) == 7
    # Tamper with the metadata: the count must then come from it (proves no scan was made) ...
    meta = records.metadata_path(str(tmp_path), "train")
    data = json.load(open(meta))
    data["num_examples"] = 1234
    json.dump(data, open(meta, "w"))
    assert records.count_records(info["file_pattern"]) == 1234
    # ... and a pattern that matches a subset of the shards is counted by scanning them.
    one = os.path.join(str(tmp_path), "train-00000-of-00002")
    assert records.count_records(one) == 4
    os.remove(meta)
    assert records.count_records(info["file_pattern"]) == 7
    with pytest.raises(ValueError, match="No TFRecord files match"):
        records.count_records(os.path.join(str(tmp_path), "nothing-*"))


def test_writing_is_atomic_and_failure_leaves_nothing(tmp_path):
    def failing():
        yield records.make_example(b"x", 1, 1, 1, 3).SerializeToString()
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        records.write_sharded_records(failing(), str(tmp_path), "train", 2, progress=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="No examples"):
        records.write_sharded_records(iter([]), str(tmp_path), "train", 2, progress=False)
    assert os.listdir(tmp_path) == []


def test_progress_bar_reports_counts(tmp_path, capsys):
    records.convert_arrays(smooth_images(5, 8, 8), np.arange(5), str(tmp_path), "train", 1, progress=True)
    assert "5/5" in capsys.readouterr().out  # keras.utils.Progbar, on stdout like Keras's bars


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((0, 8, 8), np.uint8), np.zeros(0, int), "`images` is empty"),
        (np.zeros((2, 8, 8), np.float32), np.zeros(2, int), "must be uint8"),
        (np.zeros((2, 8, 8), np.uint8), np.zeros(3, int), "`labels` must have shape"),
        (np.zeros((2, 8, 8), np.uint8), np.array([0, -1]), "0-based"),
        (np.zeros((2, 8, 8, 2), np.uint8), np.zeros(2, int), "must have shape"),
    ],
)
def test_convert_arrays_rejects_bad_input(tmp_path, images, labels, match):
    with pytest.raises(ValueError, match=match):
        records.convert_arrays(images, labels, str(tmp_path), "train", 1, progress=False)


def test_convert_arrays_labels_out_of_range_for_class_names(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        records.convert_arrays(
            np.zeros((2, 8, 8), np.uint8), np.array([0, 2]), str(tmp_path), "t", 1, class_names=["a", "b"],
            progress=False,
        )


def test_bad_num_shards_and_example_fields():
    with pytest.raises(ValueError, match="num_shards=0"):
        records.shard_names("train", 0)
    with pytest.raises(ValueError, match="label=-1"):
        records.make_example(b"", -1, 1, 1, 3)
    with pytest.raises(ValueError, match="channels=2"):
        records.make_example(b"", 1, 1, 1, 2)


def _real_photos():
    """Real photographs shipped by scikit-learn and scikit-image, as uint8 RGB arrays."""
    from sklearn.datasets import load_sample_images
    from skimage import data as skdata

    photos = list(load_sample_images().images)  # china.jpg, flower.jpg (427x640x3)
    photos += [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    grey = skdata.camera()  # a grey photograph
    return photos, grey


def _imagenet_folder(root):
    """Lays real photos out as ImageNet: train/<synset>/*.JPEG (+ one PNG), val/*.JPEG and a labels file."""
    photos, grey = _real_photos()
    synsets = ["n00000001", "n00000002", "n00000003"]
    layout = {}
    for k, img in enumerate(photos):
        s = synsets[k % 3]
        os.makedirs(os.path.join(root, "train", s), exist_ok=True)
        small = tf.image.resize(img, [img.shape[0] // 4, img.shape[1] // 4]).numpy().astype(np.uint8)
        path = os.path.join(root, "train", s, f"{s}_{k}.JPEG")
        tf.io.write_file(path, tf.io.encode_jpeg(small, quality=90))
        layout[os.path.basename(path)] = (s, small)
    png = os.path.join(root, "train", synsets[2], "extra.png")
    tf.io.write_file(png, tf.io.encode_png(grey[::4, ::4, None]))
    layout["extra.png"] = (synsets[2], grey[::4, ::4, None])
    os.makedirs(os.path.join(root, "val"))
    val_synsets = []
    for k, img in enumerate(photos[:3]):
        path = os.path.join(root, "val", f"ILSVRC2012_val_{k + 1:08d}.JPEG")
        small = img[::5, ::5].copy()
        tf.io.write_file(path, tf.io.encode_jpeg(small, quality=90))
        val_synsets.append(synsets[(k + 1) % 3])
        layout[os.path.basename(path)] = (val_synsets[-1], small)
    with open(os.path.join(root, "val_labels.txt"), "w") as fh:
        fh.write("\n".join(val_synsets) + "\n")
    with open(os.path.join(root, "synset_words.txt"), "w") as fh:
        fh.write("n00000001 first class\nn00000002 second class\nn00000003 third, class\n")
    return synsets, layout


def test_convert_image_folder_on_real_photographs(tmp_path):
    root = str(tmp_path / "imagenet")
    synsets, layout = _imagenet_folder(root)
    out = str(tmp_path / "records")
    train = records.convert_image_folder(
        os.path.join(root, "train"), out, "train", 2, synset_texts_file=os.path.join(root, "synset_words.txt"),
        progress=False,
    )
    assert train["num_examples"] == 7 and train["num_classes"] == 3
    assert train["synsets"] == synsets and train["class_names"][2] == "third, class"
    val = records.convert_image_folder(
        os.path.join(root, "val"), out, "validation", 2, class_to_label=train["class_to_label"],
        labels_file=os.path.join(root, "val_labels.txt"), progress=False,
    )
    assert val["num_examples"] == 3
    seen = {}
    for pattern in (train["file_pattern"], val["file_pattern"]):
        for ex in _read_all(pattern):
            name = ex[records.FILENAME_KEY].decode()
            synset, original = layout[name]
            assert ex[records.LABEL_KEY] == synsets.index(synset) + 1
            assert ex[records.SYNSET_KEY] == synset.encode()
            decoded = tf.io.decode_jpeg(ex[records.ENCODED_KEY]).numpy()
            assert decoded.shape[:2] == original.shape[:2]
            assert (ex[records.HEIGHT_KEY], ex[records.WIDTH_KEY]) == original.shape[:2]
            assert np.abs(decoded.astype(int) - original).mean() < 6.0
            seen[name] = ex
    assert len(seen) == len(layout)
    # JPEG files are stored byte for byte; the PNG was re-encoded to a JPEG with 3 channels.
    first = next(n for n in layout if n.endswith(".JPEG") and not n.startswith("ILSVRC"))
    s = layout[first][0]
    assert seen[first][records.ENCODED_KEY] == open(os.path.join(root, "train", s, first), "rb").read()
    assert seen["extra.png"][records.ENCODED_KEY][:2] == b"\xff\xd8"
    assert seen["extra.png"][records.CHANNELS_KEY] == 3


def test_convert_image_folder_validation_labels_as_filename_pairs(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "val"))
    for k in range(3):
        tf.io.write_file(os.path.join(root, "val", f"v{k}.JPEG"), tf.io.encode_jpeg(smooth_images(1, 16, 16, k)[0]))
    with open(os.path.join(root, "labels.csv"), "w") as fh:
        fh.write("ImageId,PredictionString\nv2,b 1 2 3 4\nv0,a 1 2 3 4\nv1,b\n")
    info = records.convert_image_folder(
        os.path.join(root, "val"), str(tmp_path / "out"), "validation", 1, class_to_label={"a": 1, "b": 2},
        labels_file=os.path.join(root, "labels.csv"), progress=False,
    )
    got = {e[records.FILENAME_KEY]: e[records.LABEL_KEY] for e in _read_all(info["file_pattern"])}
    assert got == {b"v0.JPEG": 1, b"v1.JPEG": 2, b"v2.JPEG": 2}


def test_convert_image_folder_errors_name_the_source(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        records.convert_image_folder(missing, str(tmp_path / "o"), "train", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        records.convert_image_folder(str(empty), str(tmp_path / "o"), "train", 1)
    (empty / "n1").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        records.convert_image_folder(str(empty), str(tmp_path / "o"), "train", 1)
    bad = tmp_path / "bad" / "n1"
    bad.mkdir(parents=True)
    tf.io.write_file(str(bad / "good.JPEG"), tf.io.encode_jpeg(smooth_images(1, 8, 8)[0]))
    (bad / "broken.JPEG").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="broken.JPEG"):
        records.convert_image_folder(str(tmp_path / "bad"), str(tmp_path / "o"), "train", 1, progress=False)
    assert not os.path.exists(tmp_path / "o") or os.listdir(tmp_path / "o") == []
