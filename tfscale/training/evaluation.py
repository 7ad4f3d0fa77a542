"""Exact top-k accuracy over a whole evaluation set."""

from __future__ import annotations

import tensorflow as tf


def evaluate_top_k(model, dataset, ks=(1, 5)) -> dict:
    """Counts the exact top-k accuracy of `model` over every example of `dataset`, on one device.

    Keras's `evaluate` under `MirroredStrategy` reports the *mean over replicas* of each replica's own accuracy,
    which differs slightly from the accuracy over all images when replicas see different numbers of real images
    (the last, padded evaluation step). This pass counts correct predictions directly, so `top1` is exactly
    (correct images) / (images), as the papers report it.

    Args:
        model: a Keras classifier mapping `float32 [batch, H, W, C]` images to logits `[batch, num_classes]`.
        dataset: a finite, not distributed `tf.data.Dataset` of `(images, one-hot labels [batch, num_classes])`
            or `(images, one-hot labels, weights float32 [batch])`; examples with weight 0 (padding) are not
            counted.
        ks: the k values to report. Default (1, 5).

    Returns:
        dict with `top1`, `top5`, … (floats in [0, 1]) and `num_examples` (int, the total weight).

    Raises:
        ValueError: if `dataset` holds no example with a non-zero weight, or a k is < 1.
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"Argument `ks` must hold integers >= 1. Received: ks={ks!r}")

    @tf.function
    def step(images, labels, weights):
        logits = model(images, training=False)
        targets = tf.argmax(labels, axis=-1)
        k_max = tf.minimum(max(ks), tf.shape(logits)[-1])
        _, top = tf.math.top_k(logits, k=k_max)
        hits = tf.cast(tf.equal(top, tf.cast(targets, top.dtype)[:, None]), tf.float32)  # [batch, k_max]
        cumulative = tf.cumsum(hits, axis=-1)
        return [tf.reduce_sum(weights * cumulative[:, tf.minimum(k, k_max) - 1]) for k in ks], \
            tf.reduce_sum(weights)

    correct = [0.0] * len(ks)
    total = 0.0
    for element in dataset:
        images, labels = element[0], element[1]
        weights = element[2] if len(element) > 2 else tf.ones(tf.shape(labels)[:1], tf.float32)
        hits, count = step(images, labels, tf.cast(weights, tf.float32))
        correct = [c + float(h) for c, h in zip(correct, hits)]
        total += float(count)
    if total <= 0:
        raise ValueError("Argument `dataset` holds no example with a non-zero weight.")
    results = {f"top{k}": c / total for k, c in zip(ks, correct)}
    results["num_examples"] = int(round(total))
    return results
