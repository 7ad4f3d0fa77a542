"""The gradient shapes of a model: what one replica all-reduces per step.

One definition for the all-reduce benchmarks and the planner's default workload
(`tfscale.planning.Workload.num_parameters`), taken from the model itself.
"""

import functools

__all__ = ["gradient_shapes"]


@functools.lru_cache(maxsize=None)
def gradient_shapes(name="resnet50", num_classes=1000, image_size=None):
    """Returns the shapes of the trainable weights of model `name`: its gradients, in order.

    Builds the model once per argument set (cached; ResNet-50 takes about 2 s on a CPU).

    Args:
      name: a key of `tfscale.models.MODELS`. Default ``"resnet50"``.
      num_classes: int >= 1, classes of the last layer. Default 1000.
      image_size: int or None (the model's default): input height and width, pixels.
        Gradient shapes do not depend on it for these models, but small sizes build faster.

    Returns:
      tuple of tuples of ints, e.g. 161 shapes, 25,557,032 float32 values (97.5 MiB) for
      ResNet-50 with 1000 classes.

    Raises:
      ValueError: for an unknown model name (listing the valid ones).
    """
    from tfscale.models.resnet import build_model  # noqa: PLC0415 (imports Keras)

    kwargs = {"num_classes": num_classes}
    if image_size is not None:
        kwargs["image_size"] = image_size
    model = build_model(name, **kwargs)
    return tuple(tuple(int(d) for d in w.shape) for w in model.trainable_weights)
