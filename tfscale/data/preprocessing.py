"""Per-image preprocessing of JPEG-encoded ImageNet-style records.

The training recipe is the one of the TPU reference ResNet (`resnet_preprocessing.py`) that Ying et al.,
"Image Classification at Supercomputer Scale", arXiv:1811.06992, use to keep 1024 TPU chips fed:

1. `tf.io.extract_jpeg_shape` reads height and width from the JPEG header (no decode);
2. `tf.image.sample_distorted_bounding_box` samples a crop (area 8-100 %, aspect 3/4-4/3, 10 attempts);
3. the fused `tf.image.decode_and_crop_jpeg` decodes only the crop window;
4. the crop is resized to the output size and randomly flipped left-right.

If no crop satisfying the constraints is found in `max_attempts` tries the sampler returns the whole image and
the recipe falls back to the evaluation centre crop. The evaluation recipe is a centre crop covering
`central_fraction` (224/256 by default) of the shorter side, resized to the output size.

A second training flavour, `pad_and_crop`, is the CIFAR-style augmentation (He et al., "Deep Residual Learning",
arXiv:1512.03385): zero-pad by a few pixels, crop back to the original size at a random offset, flip. It is the
better choice for tiny images such as 28x28 Fashion-MNIST, where an 8 % area crop leaves a few pixels.

All functions take a scalar `tf.string` of JPEG bytes (grey or colour; grey is decoded to 3 channels) and return
`[image_size, image_size, 3]` pixel values in [0, 255] (not yet normalised): float32 by default, or uint8 (rounded)
or bfloat16 with `dtype=`. uint8 is the cheapest output on the host: the random flip then moves 1 byte per value
instead of 4, and the normalisation runs inside the model, on the accelerator, as in the TPU reference
(`tfscale.models.resnet_imagenet(..., input_normalization="imagenet")`). `normalize_images` maps pixels to
`(x / 255 - mean) / std` in the requested dtype and works on one image or on a batch.

Randomness: with `seed` (an int) the crop and flip use stateful random ops with op-level seeds, whose sequence is
shared by all the parallel calls of a `tf.data` map (so which image gets which crop depends on thread timing). With
`stateless_seed` (an int64 `[2]` tensor, one per image, e.g. from `tf.data.Dataset.random`) they use TensorFlow's
stateless random ops: the crop and flip of an image are a function of its seed alone, so a pipeline is
reproducible whatever its parallelism. `tfscale.data.imagenet_dataset` uses stateless seeds.

`preprocess_pixels_for_train` applies the training recipe to already decoded uint8 pixels: it serves the decoded-image
cache (`imagenet_dataset(..., cache="decoded")`), where the JPEG is decoded once and the random crop and flip still
change every epoch.
"""

import numpy as np
import tensorflow as tf

#: Per-channel RGB mean of ImageNet on the [0, 1] scale (the torchvision / Model Garden constants).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet on the [0, 1] scale.
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
#: Fraction of the shorter side kept by the evaluation centre crop (224/256, TPU reference).
DEFAULT_CENTRAL_FRACTION = 224.0 / 256.0
#: Default area range of the training crop, as fractions of the image area (TPU reference).
DEFAULT_AREA_RANGE = (0.08, 1.0)
#: Default aspect-ratio (width / height) range of the training crop (TPU reference).
DEFAULT_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)

TRAIN_CROP_MODES = ("inception", "pad_and_crop")
RESIZE_METHODS = ("bilinear", "bicubic", "area", "nearest")
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
#: dtypes of un-normalised pixel values in [0, 255] (bfloat16 and float16 hold the integers 0..255 exactly).
PIXEL_DTYPES = ("uint8", "bfloat16", "float16", "float32")


def validate_range(name, value, low, high):
    """Checks that `value` is a pair `(a, b)` with `low < a <= b <= high`.

    Args:
      name: str, the argument name used in the error message.
      value: a pair of Python floats.
      low: float, exclusive lower bound of `a`.
      high: float or None, inclusive upper bound of `b` (None: no bound).

    Returns:
      The pair as a tuple of two floats.

    Raises:
      ValueError: if `value` is not such a pair.
    """
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Argument `{name}` must be a pair (min, max) of numbers. Received: {name}={value!r}"
        ) from None
    if not (a > low and a <= b and (high is None or b <= high)):
        bound = f"<= {high}" if high is not None else ""
        raise ValueError(
            f"Argument `{name}` must satisfy {low} < min <= max {bound}. Received: {name}={value!r}"
        )
    return (a, b)


def _validate_image_size(image_size):
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"Argument `image_size` must be an int > 0. Received: image_size={image_size!r}")


def _validate_resize_method(resize_method):
    if resize_method not in RESIZE_METHODS:
        raise ValueError(
            f"Argument `resize_method` must be one of {list(RESIZE_METHODS)}. "
            f"Received: resize_method={resize_method!r}"
        )


def _resize(image, image_size, resize_method):
    """Resizes float/uint8 `[h, w, 3]` to float32 `[image_size, image_size, 3]` (values kept in [0, 255])."""
    image = tf.image.resize(image, [image_size, image_size], method=resize_method)
    if resize_method == "bicubic":
        image = tf.clip_by_value(image, 0.0, 255.0)
    return tf.ensure_shape(tf.cast(image, tf.float32), [image_size, image_size, 3])


def center_crop_window(image_shape, central_fraction=DEFAULT_CENTRAL_FRACTION):
    """Returns the centre square crop window of an image.

    The square side is `central_fraction * min(height, width)` (rounded down, at least 1 pixel), the TPU
    reference's evaluation crop for `central_fraction = 224/256`.

    Args:
      image_shape: int32 `[3]` or `[2]` tensor, `(height, width[, channels])` in pixels.
      central_fraction: float in (0, 1], fraction of the shorter side kept. Default 224/256.

    Returns:
      int32 `[4]` tensor `(offset_y, offset_x, crop_height, crop_width)` in pixels, the format of
      `tf.image.decode_and_crop_jpeg`'s `crop_window`.

    Raises:
      ValueError: if `central_fraction` is not in (0, 1].
    """
    if not 0.0 < float(central_fraction) <= 1.0:
        raise ValueError(
            f"Argument `central_fraction` must be in (0, 1]. Received: central_fraction={central_fraction!r}"
        )
    height, width = image_shape[0], image_shape[1]
    side = tf.cast(float(central_fraction) * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    side = tf.maximum(side, 1)
    offset_y = (height - side + 1) // 2
    offset_x = (width - side + 1) // 2
    return tf.stack([offset_y, offset_x, side, side])


def decode_and_center_crop(image_bytes, central_fraction=DEFAULT_CENTRAL_FRACTION):
    """Decodes the centre square crop of a JPEG with the fused `decode_and_crop_jpeg`.

    Args:
      image_bytes: scalar `tf.string`, JPEG bytes (grey or RGB).
      central_fraction: float in (0, 1], fraction of the shorter side kept. Default 224/256.

    Returns:
      uint8 `[side, side, 3]` with `side = floor(central_fraction * min(height, width))`.

    Raises:
      ValueError: for a bad `central_fraction`.
      tf.errors.InvalidArgumentError: at run time, for bytes that are not a decodable JPEG.
    """
    shape = tf.io.extract_jpeg_shape(image_bytes)
    window = center_crop_window(shape, central_fraction)
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)


def sample_crop_window(
    image_shape,
    area_range=DEFAULT_AREA_RANGE,
    aspect_ratio_range=DEFAULT_ASPECT_RATIO_RANGE,
    max_attempts=10,
    min_object_covered=0.1,
    seed=None,
    stateless_seed=None,
):
    """Samples a random crop window with `tf.image.sample_distorted_bounding_box`.

    The whole image is the only bounding box, so `min_object_covered` is a lower bound of the crop area.

    Args:
      image_shape: int32 `[3]` tensor `(height, width, channels)` in pixels (e.g. from `tf.io.extract_jpeg_shape`).
      area_range: pair of floats in (0, 1], crop area as a fraction of the image area. Default (0.08, 1.0).
      aspect_ratio_range: pair of floats > 0, crop width / height. Default (3/4, 4/3).
      max_attempts: int > 0, tries before the sampler returns the whole image. Default 10.
      min_object_covered: float in [0, 1], minimum fraction of the (whole-image) box covered. Default 0.1.
      seed: optional int, op-level seed (stateful sampler).
      stateless_seed: optional int32/int64 `[2]` tensor; when given, `tf.image.stateless_sample_distorted_bounding_box`
        samples the window as a function of this seed alone and `seed` is ignored.

    Returns:
      A pair `(window, found)`: int32 `[4]` window `(offset_y, offset_x, crop_height, crop_width)` in pixels, and
      a bool scalar, False when the sampler gave up and returned the whole image.

    Raises:
      ValueError: for bad ranges or `max_attempts`.
    """
    area_range = validate_range("area_range", area_range, 0.0, 1.0)
    aspect_ratio_range = validate_range("aspect_ratio_range", aspect_ratio_range, 0.0, None)
    if not isinstance(max_attempts, int) or max_attempts <= 0:
        raise ValueError(f"Argument `max_attempts` must be an int > 0. Received: max_attempts={max_attempts!r}")
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
    kwargs = dict(
        bounding_boxes=bbox,
        min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    if stateless_seed is not None:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(image_shape, seed=stateless_seed, **kwargs)
    else:
        if seed is not None:
            kwargs["seed"] = seed
        begin, size, _ = tf.image.sample_distorted_bounding_box(image_shape, **kwargs)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    found = tf.logical_not(tf.logical_and(tf.equal(size[0], image_shape[0]), tf.equal(size[1], image_shape[1])))
    # A successful sample may legitimately be the whole image when area_range reaches 1 and the image is
    # square-ish; the TPU reference treats that case as a fallback too (centre crop), and so do we.
    return window, found


def preprocess_for_train(
    image_bytes,
    image_size,
    area_range=DEFAULT_AREA_RANGE,
    aspect_ratio_range=DEFAULT_ASPECT_RATIO_RANGE,
    max_attempts=10,
    central_fraction=DEFAULT_CENTRAL_FRACTION,
    resize_method="bilinear",
    flip=True,
    seed=None,
    *,
    stateless_seed=None,
    dtype="float32",
):
    """The TPU-reference training recipe on one JPEG (Ying et al., arXiv:1811.06992).

    `extract_jpeg_shape` -> `sample_distorted_bounding_box` -> fused `decode_and_crop_jpeg` -> resize -> random
    left-right flip; when no crop is found in `max_attempts` tries, the evaluation centre crop is used instead.

    Args:
      image_bytes: scalar `tf.string`, JPEG bytes (grey or RGB; grey is decoded to 3 channels).
      image_size: int > 0, output height and width in pixels.
      area_range: pair in (0, 1], crop area as a fraction of the image area. Default (0.08, 1.0).
      aspect_ratio_range: pair > 0, crop width / height. Default (3/4, 4/3).
      max_attempts: int > 0, crop sampling tries. Default 10.
      central_fraction: float in (0, 1], fallback centre-crop fraction. Default 224/256.
      resize_method: one of "bilinear" (default), "bicubic", "area", "nearest".
      flip: bool, random left-right flip. Default True.
      seed: optional int, op-level seed of the crop sampler and the flip (stateful random ops).
      stateless_seed: optional int64 `[2]` tensor; when given, the crop and the flip are stateless functions of it
        (see the module docstring) and `seed` is ignored. Default None.
      dtype: dtype of the returned pixels: "float32" (default), "uint8" (rounded), "bfloat16" or "float16". The
        flip runs after the cast, so uint8 also makes it 4x cheaper.

    Returns:
      `dtype [image_size, image_size, 3]`, values in [0, 255].

    Raises:
      ValueError: for bad arguments.
      tf.errors.InvalidArgumentError: at run time, for bytes that are not a decodable JPEG.
    """
    _validate_image_size(image_size)
    _validate_resize_method(resize_method)
    dtype = pixel_dtype(dtype)
    shape = tf.io.extract_jpeg_shape(image_bytes)
    window = _train_window(shape, area_range, aspect_ratio_range, max_attempts, central_fraction, seed,
                           stateless_seed)
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = to_pixels(_resize(image, image_size, resize_method), dtype)
    return _random_flip(image, seed, stateless_seed) if flip else image


def preprocess_pixels_for_train(
    image,
    image_size,
    train_crop="inception",
    area_range=DEFAULT_AREA_RANGE,
    aspect_ratio_range=DEFAULT_ASPECT_RATIO_RANGE,
    max_attempts=10,
    central_fraction=DEFAULT_CENTRAL_FRACTION,
    pad_pixels=4,
    resize_method="bilinear",
    flip=True,
    seed=None,
    *,
    stateless_seed=None,
    dtype="float32",
):
    """The training recipe on already decoded pixels (the decoded-image cache of `imagenet_dataset`).

    "inception": the same crop sampling as `preprocess_for_train`, then a slice of the pixels instead of the fused
    decode-and-crop (the two differ by a few levels at the crop's edges, where libjpeg's chroma upsampling sees
    different neighbours), resize and flip. "pad_and_crop": as `preprocess_small_image_for_train`.

    Args:
      image: uint8 `[height, width, 3]`, the whole decoded image.
      image_size: int > 0, output height and width in pixels.
      train_crop: "inception" (default) or "pad_and_crop".
      area_range, aspect_ratio_range, max_attempts, central_fraction: as in `preprocess_for_train`.
      pad_pixels: int >= 0, "pad_and_crop" zero padding per side in pixels. Default 4.
      resize_method, flip, seed, stateless_seed, dtype: as in `preprocess_for_train`.

    Returns:
      `dtype [image_size, image_size, 3]`, values in [0, 255].

    Raises:
      ValueError: for bad arguments.
    """
    _validate_image_size(image_size)
    _validate_resize_method(resize_method)
    dtype = pixel_dtype(dtype)
    if train_crop == "inception":
        shape = tf.shape(image)
        window = _train_window(shape, area_range, aspect_ratio_range, max_attempts, central_fraction, seed,
                               stateless_seed)
        image = tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], -1]))
    elif train_crop == "pad_and_crop":
        image = pad_and_random_crop(image, pad_pixels, seed=seed, stateless_seed=stateless_seed)
    else:
        raise ValueError(
            f"Argument `train_crop` must be one of {list(TRAIN_CROP_MODES)}. Received: train_crop={train_crop!r}"
        )
    image = to_pixels(_resize(image, image_size, resize_method), dtype)
    return _random_flip(image, seed, stateless_seed) if flip else image


def _train_window(shape, area_range, aspect_ratio_range, max_attempts, central_fraction, seed, stateless_seed):
    """The sampled crop window, or the centre crop when the sampler gave up (TPU reference)."""
    window, found = sample_crop_window(shape, area_range, aspect_ratio_range, max_attempts, seed=seed,
                                       stateless_seed=stateless_seed)
    return tf.cond(found, lambda: window, lambda: center_crop_window(shape, central_fraction))


def _random_flip(image, seed, stateless_seed):
    """Random left-right flip of `[h, w, c]`: stateless with `stateless_seed`, else with op seed `seed + 1`."""
    if stateless_seed is not None:
        # An independent stream: the crop used `stateless_seed` itself.
        return tf.image.stateless_random_flip_left_right(image, _other_stateless_seed(stateless_seed))
    return tf.image.random_flip_left_right(image, seed=_other_seed(seed))


def pad_and_random_crop(image, pad_pixels=4, seed=None, *, stateless_seed=None):
    """CIFAR-style augmentation: zero-pad every side by `pad_pixels`, crop the original size at a random offset.

    Reference: He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385, section 4.2.

    Args:
      image: uint8 or float `[height, width, 3]`.
      pad_pixels: int >= 0, padding on each side in pixels. Default 4.
      seed: optional int, op-level seed.
      stateless_seed: optional int64 `[2]` tensor; when given, `tf.image.stateless_random_crop` is used and `seed`
        is ignored.

    Returns:
      A tensor of the same dtype and shape `[height, width, 3]`.

    Raises:
      ValueError: if `pad_pixels` is negative or not an int.
    """
    if not isinstance(pad_pixels, int) or pad_pixels < 0:
        raise ValueError(f"Argument `pad_pixels` must be an int >= 0. Received: pad_pixels={pad_pixels!r}")
    if pad_pixels == 0:
        return image
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad_pixels, pad_pixels], [pad_pixels, pad_pixels], [0, 0]])
    if stateless_seed is not None:
        return tf.image.stateless_random_crop(padded, shape, seed=stateless_seed)
    return tf.image.random_crop(padded, shape, seed=seed)


def preprocess_small_image_for_train(
    image_bytes, image_size, pad_pixels=4, resize_method="bilinear", flip=True, seed=None, *, stateless_seed=None,
    dtype="float32",
):
    """Training recipe for small images (e.g. 28x28 Fashion-MNIST): full decode, pad-and-crop, resize, flip.

    Args:
      image_bytes: scalar `tf.string`, JPEG bytes (grey or RGB; grey is decoded to 3 channels).
      image_size: int > 0, output height and width in pixels (the image is resized only if it differs).
      pad_pixels: int >= 0, zero padding per side before the random crop, in pixels of the stored image.
        Default 4.
      resize_method: one of "bilinear" (default), "bicubic", "area", "nearest".
      flip: bool, random left-right flip. Default True.
      seed: optional int, op-level seed.
      stateless_seed: optional int64 `[2]` tensor: stateless crop and flip (see `preprocess_for_train`).
      dtype: dtype of the returned pixels, "float32" (default), "uint8", "bfloat16" or "float16".

    Returns:
      `dtype [image_size, image_size, 3]`, values in [0, 255].

    Raises:
      ValueError: for bad arguments.
      tf.errors.InvalidArgumentError: at run time, for bytes that are not a decodable JPEG.
    """
    _validate_image_size(image_size)
    _validate_resize_method(resize_method)
    dtype = pixel_dtype(dtype)
    image = tf.io.decode_jpeg(image_bytes, channels=3)
    image = pad_and_random_crop(image, pad_pixels, seed=seed, stateless_seed=stateless_seed)
    image = to_pixels(_resize(image, image_size, resize_method), dtype)
    return _random_flip(image, seed, stateless_seed) if flip else image


def preprocess_for_eval(
    image_bytes, image_size, central_fraction=DEFAULT_CENTRAL_FRACTION, resize_method="bilinear", *,
    dtype="float32",
):
    """The evaluation recipe: fused centre crop of `central_fraction` of the shorter side, then resize.

    Deterministic: the same bytes always give the same output.

    Args:
      image_bytes: scalar `tf.string`, JPEG bytes (grey or RGB; grey is decoded to 3 channels).
      image_size: int > 0, output height and width in pixels.
      central_fraction: float in (0, 1], fraction of the shorter side kept. Default 224/256 (TPU reference).
        Use 1.0 for tiny images that must not lose their border.
      resize_method: one of "bilinear" (default), "bicubic", "area", "nearest".
      dtype: dtype of the returned pixels, "float32" (default), "uint8" (rounded), "bfloat16" or "float16".

    Returns:
      `dtype [image_size, image_size, 3]`, values in [0, 255].

    Raises:
      ValueError: for bad arguments.
      tf.errors.InvalidArgumentError: at run time, for bytes that are not a decodable JPEG.
    """
    _validate_image_size(image_size)
    _validate_resize_method(resize_method)
    dtype = pixel_dtype(dtype)
    image = decode_and_center_crop(image_bytes, central_fraction)
    return to_pixels(_resize(image, image_size, resize_method), dtype)


def normalize_images(images, mean=IMAGENET_MEAN_RGB, stddev=IMAGENET_STDDEV_RGB, dtype="float32"):
    """Maps pixel values in [0, 255] to `(x / 255 - mean) / stddev` per channel, in `dtype`.

    With the ImageNet defaults the output lies in about [-2.12, 2.64]; with `mean=(0, 0, 0)` and
    `stddev=(1, 1, 1)` it lies in [0, 1].

    Args:
      images: float32 or uint8 `[..., 3]` (one image or a batch), values in [0, 255].
      mean: 3 floats, per-channel RGB mean on the [0, 1] scale. Default: ImageNet `(0.485, 0.456, 0.406)`.
      stddev: 3 floats > 0, per-channel RGB standard deviation on the [0, 1] scale. Default: ImageNet
        `(0.229, 0.224, 0.225)`.
      dtype: output dtype, "float32" (default), "bfloat16" or "float16" (or the matching `tf.DType`).

    Returns:
      A tensor of `images`'s shape in `dtype`.

    Raises:
      ValueError: if `mean`/`stddev` do not have 3 entries, a stddev is <= 0, or `dtype` is not supported.
    """
    mean = _three_floats("mean", mean)
    stddev = _three_floats("stddev", stddev)
    if min(stddev) <= 0:
        raise ValueError(f"Argument `stddev` must have 3 entries > 0. Received: stddev={stddev!r}")
    dtype = output_dtype(dtype)
    scale = np.array([1.0 / (255.0 * s) for s in stddev], np.float32)
    offset = np.array([m / s for m, s in zip(mean, stddev)], np.float32)
    images = tf.convert_to_tensor(images)
    inner = images.shape[-3:] if images.shape.rank is not None and images.shape.rank >= 3 else None
    if inner is not None and inner.is_fully_defined():
        # Full-size [h, w, 3] constants: Eigen's per-channel broadcast over the last axis is slow (measured
        # 0.4 ms more CPU per 224x224 image on 2 cores than these same-shape multiply/subtract ops).
        scale = np.broadcast_to(scale, inner.as_list())
        offset = np.broadcast_to(offset, inner.as_list())
    images = tf.cast(images, tf.float32) * tf.constant(scale) - tf.constant(offset)
    return tf.cast(images, dtype)


def output_dtype(dtype):
    """Returns the `tf.DType` for "float32", "bfloat16" or "float16".

    Args:
      dtype: str or `tf.DType`.

    Returns:
      The `tf.DType`.

    Raises:
      ValueError: for any other dtype.
    """
    name = tf.as_dtype(dtype).name if isinstance(dtype, tf.DType) else dtype
    if name not in OUTPUT_DTYPES:
        raise ValueError(f"Argument `dtype` must be one of {list(OUTPUT_DTYPES)}. Received: dtype={dtype!r}")
    return tf.as_dtype(name)


def pixel_dtype(dtype):
    """Returns the `tf.DType` for un-normalised pixels: "uint8", "bfloat16", "float16" or "float32".

    Args:
      dtype: str or `tf.DType`.

    Returns:
      The `tf.DType`.

    Raises:
      ValueError: for any other dtype.
    """
    name = tf.as_dtype(dtype).name if isinstance(dtype, tf.DType) else dtype
    if name not in PIXEL_DTYPES:
        raise ValueError(f"Argument `dtype` must be one of {list(PIXEL_DTYPES)}. Received: dtype={dtype!r}")
    return tf.as_dtype(name)


def to_pixels(image, dtype="uint8"):
    """Casts float32 pixel values in [0, 255] to `dtype`; uint8 is rounded to the nearest level.

    Args:
      image: float32 `[..., 3]`, values in [0, 255] (e.g. the output of a bilinear resize of uint8 pixels).
      dtype: "uint8" (default), "bfloat16", "float16" or "float32" (or the matching `tf.DType`).

    Returns:
      `image` in `dtype`, same shape.

    Raises:
      ValueError: for an unsupported `dtype`.
    """
    dtype = pixel_dtype(dtype)
    if dtype == tf.uint8:
        # The inputs lie in [0, 255] (bilinear/area/nearest of uint8; bicubic is clipped in _resize), so adding
        # 0.5 and truncating rounds without a clip.
        return tf.cast(image + 0.5, tf.uint8)
    return tf.cast(image, dtype)


def _other_stateless_seed(seed):
    """A second stateless seed derived from `seed` (int32/int64 `[2]`), for an independent stream."""
    seed = tf.convert_to_tensor(seed)
    return seed + tf.constant([0, 1], seed.dtype)


def _other_seed(seed):
    """A second op seed derived from `seed`, so the flip is not correlated with the crop (None stays None)."""
    return None if seed is None else int(seed) + 1


def _three_floats(name, value):
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise ValueError(f"Argument `{name}` must have 3 numbers (R, G, B). Received: {name}={value!r}")
    return values
