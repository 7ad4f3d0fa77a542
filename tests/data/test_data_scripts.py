"""Tests of scripts/build_tfrecords.py and scripts/benchmark_input.py (run in-process through `run`)."""

import glob
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from datahelpers import smooth_images
from tfscale.data import records

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_flags(**kw):
    base = dict(source="fashion_mnist", source_dir=None, output_dir=None, num_shards=2, eval_num_shards=None,
                train_subdir="train", validation_subdir="validation", validation_labels_file=None,
                synset_texts_file=None, progress=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_build_tfrecords_imagenet_folder(tmp_path):
    build = _load("build_tfrecords")
    root = tmp_path / "imagenet"
    for k, s in enumerate(["n02", "n01"]):
        (root / "train" / s).mkdir(parents=True)
        for i, img in enumerate(smooth_images(3, 20, 30, seed=k)):
            tf.io.write_file(str(root / "train" / s / f"{s}_{i}.JPEG"), tf.io.encode_jpeg(img))
    (root / "validation").mkdir()
    tf.io.write_file(str(root / "validation" / "v1.JPEG"), tf.io.encode_jpeg(smooth_images(1, 20, 30)[0]))
    (root / "val.txt").write_text("n02\n")
    out = build.run(_build_flags(source="imagenet", source_dir=str(root), output_dir=str(tmp_path / "out"),
                                 validation_labels_file=str(root / "val.txt"), num_shards=3, eval_num_shards=1))
    assert out["train"]["num_examples"] == 6 and out["validation"]["num_examples"] == 1
    assert out["train"]["synsets"] == ["n01", "n02"]  # sorted: n01 -> label 1
    assert records.count_records(out["validation"]["file_pattern"]) == 1
    assert len(os.listdir(tmp_path / "out")) == 3 + 1 + 2  # shards + metadata files


def test_build_tfrecords_errors_name_the_flag_or_directory(tmp_path):
    build = _load("build_tfrecords")
    with pytest.raises(ValueError, match="--output_dir"):
        build.run(_build_flags())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build.run(_build_flags(source="imagenet", source_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        build.run(_build_flags(source_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "o")))


def test_build_tfrecords_command_line_on_the_debian_files(tmp_path):
    from tfscale.data import fashion_mnist

    if not fashion_mnist.source_available():
        pytest.skip("dataset-fashion-mnist is not installed")
    # The real command (70,000 images) takes ~15 s on 2 idle cores; a tiny IDX copy keeps the test short.
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 30), ("validation", 10)):
        img_name, lbl_name = fashion_mnist._FILES[split]
        images, labels = fashion_mnist.load_arrays(split=split)
        for name, arr, magic in ((img_name, images[:n], 2051), (lbl_name, labels[:n], 2049)):
            with gzip.open(src / name, "wb") as fh:
                fh.write(np.array([magic, n, *arr.shape[1:]], ">u4").tobytes() + arr.tobytes())
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "scripts", "build_tfrecords.py"), f"--source_dir={src}",
         f"--output_dir={tmp_path / 'out'}", "--num_shards=2", "--noprogress"],
        capture_output=True, text=True, timeout=120, cwd=_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["train"] == 30 and summary["validation"] == 10


def test_benchmark_input_smoke(tmp_path):
    bench = _load("benchmark_input")
    flags_obj = types.SimpleNamespace(num_records=12, num_shards=2, image_size=32, batch_size=4, reps=1, threads=2, timed_batches=2, warmup_batches=1,
                                      records_dir=str(tmp_path / "rec"), output=str(tmp_path / "b.json"), seed=0)
    result = bench.run(flags_obj)
    saved = json.load(open(tmp_path / "b.json"))
    assert set(saved["images_per_second_median"]) == {
        "tfscale (counted skips)", "tfscale", "tfscale, float32 host-normalised", "naive",
        "naive + tfscale normalisation", "decode_jpeg floor"}
    assert saved["cpu_ms_per_image_median"]["tfscale"] == pytest.approx(
        1000.0 / saved["images_per_cpu_second_median"]["tfscale"])
    assert "CPU ms/image" in result["table"] and "load average" in result["table"]
    assert all(v > 0 for v in saved["images_per_second_median"].values())
    r = saved["images_per_second_median"]
    assert saved["ratios"]["tfscale/naive"] == pytest.approx(r["tfscale"] / r["naive"])
    assert result["skipped_records"] == 0 and "vs floor" in result["table"]
    # The photos were re-encoded at 500x375 or 375x500.
    files = sorted(glob.glob(str(tmp_path / "rec" / "train-*-of-*")))
    ex = records.parse_example(next(iter(tf.data.TFRecordDataset(files))).numpy())
    assert {ex[records.HEIGHT_KEY], ex[records.WIDTH_KEY]} == {375, 500}
