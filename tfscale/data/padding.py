"""Padded evaluation batches: every replica gets a full, static-shape batch at every step.

The TPU ResNet reference pads its evaluation set the same way (Ying et al., arXiv:1811.06992):
padding images carry sample weight 0, so loss, top-1 and top-5 are exactly those of the real
images.
"""

import tensorflow as tf

__all__ = ["pad_eval_batches"]


def pad_eval_batches(dataset, batch_size, num_replicas):
    """Pads a finite evaluation dataset so every replica gets a full batch at every step; padding has weight 0.

    Under `MirroredStrategy` the last evaluation step can leave some replicas with an empty or partial batch.
    Empty batches crash oneDNN's CPU convolution in TF 2.21 (it returns the input's shape for a 0-image batch),
    and TPUs need static shapes anyway, so, like the TPU reference's padded evaluation, the last batch is padded
    to `batch_size` and whole padding batches are added until the number of batches divides by `num_replicas`.
    The third element is the Keras sample weight: 1 for real images, 0 for padding, so loss, top-1 and top-5 are
    exactly those of the real images.

    Args:
        dataset: `tf.data.Dataset` of `(images [b, H, W, C], one-hot labels [b, K])` batches, b <= batch_size.
        batch_size: per-replica batch size (images).
        num_replicas: replicas this input pipeline feeds.

    Returns:
        A `tf.data.Dataset` of `(images [batch_size, H, W, C], labels [batch_size, K], weights float32
        [batch_size])`.

    Raises:
        ValueError: if `batch_size` or `num_replicas` is not an int >= 1.
    """
    for name, value in (("batch_size", batch_size), ("num_replicas", num_replicas)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Argument `{name}` must be an int >= 1. Received: {name}={value!r}")
    def pad_batch(x, y):
        n = tf.shape(x)[0]
        pad = batch_size - n
        w = tf.concat([tf.ones([n], tf.float32), tf.zeros([pad], tf.float32)], 0)
        x = tf.pad(x, [[0, pad]] + [[0, 0]] * (len(x.shape) - 1))
        y = tf.pad(y, [[0, pad], [0, 0]])
        return tf.ensure_shape(x, [batch_size] + x.shape[1:]), tf.ensure_shape(y, [batch_size] + y.shape[1:]), w

    def pad_group(x, y, w):  # [k <= num_replicas, batch, ...] -> [num_replicas, batch, ...]
        pad = num_replicas - tf.shape(x)[0]
        return (tf.pad(x, [[0, pad]] + [[0, 0]] * (len(x.shape) - 1)),
                tf.pad(y, [[0, pad], [0, 0], [0, 0]]),
                tf.pad(w, [[0, pad], [0, 0]]))

    dataset = dataset.map(pad_batch)
    if num_replicas > 1:
        dataset = dataset.batch(num_replicas).map(pad_group).unbatch()
    return dataset.prefetch(tf.data.AUTOTUNE)
