"""Helpers shared by the tfscale.data tests: small images with known content, record writing."""

import numpy as np
import tensorflow as tf


def smooth_images(n, height, width, seed=0):
    """uint8 [n, height, width, 3] smooth colour images (JPEG keeps them within a few levels)."""
    rng = np.random.RandomState(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(20, 235, size=(3, 3))
        img = a * (1 - y) * (1 - x) + b * y + c * x * (1 - y)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def write_records(path, examples):
    """Writes serialized examples (bytes) into one TFRecord file."""
    with tf.io.TFRecordWriter(str(path)) as w:
        for e in examples:
            w.write(e)


def jpeg(image, quality=95):
    return tf.io.encode_jpeg(image, quality=quality).numpy()
