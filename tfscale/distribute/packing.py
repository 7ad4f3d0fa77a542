"""Tensor fusion (packing) and wire compression for all-reduce.

Fusion: many small gradients are flattened and concatenated into a few 1-D buffers
("packs") of about `bytes_per_pack` bytes before they are communicated, and cut back into
the original tensors afterwards, so that an all-reduce makes a few large transfers instead
of hundreds of small ones. This is Horovod's tensor fusion (``HOROVOD_FUSION_THRESHOLD``,
128 MiB by default; Sergeev & Del Balso, "Horovod", arXiv:1802.05799) and TF's
``CommunicationOptions(bytes_per_pack=...)``.

Three choices keep fusion cheap:

* A tensor that fills a pack on its own is never copied: its pack is a reshape of it.
* Inside a pack every tensor starts at a multiple of `alignment_bytes` (64 bytes, TF's
  ``EIGEN_MAX_ALIGN_BYTES``) padded with zeros, so that slicing a tensor back out of a pack
  (or out of an aligned shard of a pack, see `unpack_from_shards`) shares the pack's memory
  on CPU instead of copying it.
* `unpack_from_shards` rebuilds the tensors directly from the shards that an all-gather
  delivers, so the gathered pack is never concatenated; only a tensor that straddles a
  shard boundary is copied.

Compression: ``"fp16"`` or ``"bf16"`` casts the values to a 16-bit float for the wire
only; sums are accumulated in float32 (`accumulation_dtype`) and cast back to the
original dtype at the end (Mikami et al., arXiv:1811.05233, fp16 all-reduce; Ying et al.,
arXiv:1811.06992, bf16). Each cast to the wire rounds with relative error at most
``u = 2**-11`` (fp16) or ``u = 2**-8`` (bf16) for magnitudes in the normal range (fp16:
``|x| >= 2**-14``; below that fp16 rounds with absolute error at most ``2**-25``); the
all-reduce algorithms document how many
roundings a value sees (3 for the torus: input, partial sum, result), which bounds the
error of a sum ``S = sum_i x_i`` by about ``3 * u * sum_i |x_i|``. fp16 overflows above
65504 (the result is inf); bf16 has float32's range.

This module uses only public TensorFlow ops; it is device-agnostic (every op runs on the
device of the enclosing ``tf.device`` scope) and has no ``tf.distribute`` dependency.
"""

import dataclasses

import tensorflow as tf

from tfscale.distribute import validation

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_ALIGNMENT_BYTES",
    "PackSpec",
    "TensorSlot",
    "accumulation_dtype",
    "compress",
    "decompress",
    "pack",
    "unpack",
    "unpack_from_shards",
    "validate_compression",
    "wire_dtype",
]

COMPRESSIONS = (None, "fp16", "bf16")
"""The valid values of `compression`: no compression, float16 or bfloat16 on the wire."""

DEFAULT_ALIGNMENT_BYTES = 64
"""Offset alignment of each tensor inside a pack, in bytes (TF's EIGEN_MAX_ALIGN_BYTES)."""

_COMPRESSION_ALIASES = {
    None: None,
    "none": None,
    "fp16": "fp16",
    "float16": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}
_WIRE_DTYPES = {"fp16": tf.float16, "bf16": tf.bfloat16}


def validate_compression(compression):
    """Checks `compression` and returns its canonical name.

    Args:
      compression: None (or ``"none"``), ``"fp16"`` (alias ``"float16"``) or ``"bf16"``
        (alias ``"bfloat16"``); case-insensitive.

    Returns:
      None, ``"fp16"`` or ``"bf16"``.

    Raises:
      ValueError: for any other value; the message lists the valid names.
    """
    key = compression.lower() if isinstance(compression, str) else compression
    try:
        return _COMPRESSION_ALIASES[key]
    except (KeyError, TypeError):
        raise ValueError(
            f"Argument `compression` must be one of {list(COMPRESSIONS)}. "
            f"Received: compression={compression!r}"
        ) from None


def accumulation_dtype(dtype):
    """Returns the dtype in which values of `dtype` are summed.

    16-bit floats are summed in float32 (so the all-reduce of float16 gradients does not
    lose precision or overflow in partial sums); every other dtype is summed in itself.

    Args:
      dtype: a `tf.DType` or anything `tf.as_dtype` accepts.

    Returns:
      `tf.float32` for float16 and bfloat16, else ``tf.as_dtype(dtype)``.
    """
    dtype = tf.as_dtype(dtype)
    if dtype in (tf.float16, tf.bfloat16):
        return tf.float32
    return dtype


def wire_dtype(dtype, compression):
    """Returns the dtype that values of `dtype` travel in under `compression`.

    Only floating dtypes wider than the wire dtype are compressed: float32 and float64
    become float16 (``"fp16"``) or bfloat16 (``"bf16"``); float16, bfloat16, integers and
    None compression keep `dtype`.

    Args:
      dtype: a `tf.DType` or anything `tf.as_dtype` accepts.
      compression: one of `COMPRESSIONS` (or an alias, see `validate_compression`).

    Returns:
      A `tf.DType`.

    Raises:
      ValueError: if `compression` is invalid.
    """
    dtype = tf.as_dtype(dtype)
    compression = validate_compression(compression)
    if compression is None or not dtype.is_floating:
        return dtype
    target = _WIRE_DTYPES[compression]
    if dtype.size <= target.size:
        return dtype
    return target


def compress(t, compression):
    """Casts `t` to its wire dtype (see `wire_dtype`); unchanged if no cast is needed.

    Args:
      t: a `tf.Tensor` of any shape and dtype.
      compression: one of `COMPRESSIONS` (or an alias).

    Returns:
      `t` itself or ``tf.cast(t, wire_dtype(t.dtype, compression))``, same shape.

    Raises:
      ValueError: if `compression` is invalid.
    """
    target = wire_dtype(t.dtype, compression)
    return t if target == t.dtype else tf.cast(t, target)


def decompress(t, dtype):
    """Casts `t` back to `dtype` (no-op when it already has it).

    Args:
      t: a `tf.Tensor` in its wire or accumulation dtype.
      dtype: the target `tf.DType`.

    Returns:
      A `tf.Tensor` of `dtype` with the shape of `t`.
    """
    dtype = tf.as_dtype(dtype)
    return t if t.dtype == dtype else tf.cast(t, dtype)


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one packed tensor lives.

    Attributes:
      pack: int, index of its pack in the list `pack` returns.
      offset: int, first element of the tensor inside the pack (elements, not bytes).
      size: int, number of elements.
      shape: tuple of ints, the original static shape.
      dtype: `tf.DType`, the original dtype.
    """

    pack: int
    offset: int
    size: int
    shape: tuple
    dtype: tf.DType


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Everything `unpack` needs to undo `pack`.

    Attributes:
      slots: one `TensorSlot` per input tensor, in input order.
      pack_sizes: number of elements of each pack (padding included).
      pack_dtypes: `tf.DType` of each pack.
    """

    slots: tuple
    pack_sizes: tuple
    pack_dtypes: tuple

    @property
    def num_packs(self):
        """int: the number of packs."""
        return len(self.pack_sizes)

    @property
    def num_tensors(self):
        """int: the number of packed tensors."""
        return len(self.slots)


def _static_shape(t, index):
    shape = t.shape
    if not shape.is_fully_defined():
        raise ValueError(
            f"Argument `tensors` must have fully defined static shapes to be packed. "
            f"Received: tensors[{index}] with shape={shape}"
        )
    return tuple(int(d) for d in shape)


def _align(offset, alignment_elements):
    return -(-offset // alignment_elements) * alignment_elements


def pack(tensors, bytes_per_pack, alignment_bytes=DEFAULT_ALIGNMENT_BYTES):
    """Fuses `tensors` into 1-D packs of about `bytes_per_pack` bytes, one dtype per pack.

    Tensors are grouped by dtype (in order of first appearance); inside a dtype they keep
    their order and fill a pack until the next one would push it past `bytes_per_pack`, so
    a pack holds one tensor or more, and a tensor at least `bytes_per_pack` large gets a
    pack of its own (that pack is a reshape of it, no copy). Inside a pack each tensor
    starts at a multiple of `alignment_bytes`; the gaps are zeros, which sum to zero under
    all-reduce. Ops run under the caller's ``tf.device`` scope.

    Args:
      tensors: sequence of `tf.Tensor`, any dtypes, fully defined static shapes.
      bytes_per_pack: int >= 0, the fusion threshold in bytes; 0 puts all tensors of a
        dtype into one pack (TF's ``CommunicationOptions(bytes_per_pack=0)``).
      alignment_bytes: int >= 1, offset alignment in bytes inside a pack (default 64).

    Returns:
      ``(packs, spec)``: `packs` a list of 1-D `tf.Tensor`, `spec` the `PackSpec` that
      `unpack` needs.

    Raises:
      ValueError: if `bytes_per_pack` < 0, `alignment_bytes` < 1, or a tensor's shape is
        not fully defined.
      TypeError: if `bytes_per_pack` or `alignment_bytes` is not an int.
    """
    bytes_per_pack = validation.check_non_negative_int("bytes_per_pack", bytes_per_pack)
    alignment_bytes = validation.check_positive_int("alignment_bytes", alignment_bytes)
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    shapes = [_static_shape(t, i) for i, t in enumerate(tensors)]

    # Group by dtype, first appearance first, keeping order inside a dtype.
    by_dtype = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)

    # Assign tensors to packs: a list of (dtype, [tensor indices]).
    assignments = []
    for dtype, indices in by_dtype.items():
        current, current_bytes = [], 0
        for i in indices:
            nbytes = tensors[i].shape.num_elements() * dtype.size
            if current and bytes_per_pack and current_bytes + nbytes > bytes_per_pack:
                assignments.append((dtype, current))
                current, current_bytes = [], 0
            current.append(i)
            current_bytes += nbytes
        if current:
            assignments.append((dtype, current))

    slots = [None] * len(tensors)
    packs, pack_sizes, pack_dtypes = [], [], []
    for p, (dtype, indices) in enumerate(assignments):
        align = max(1, alignment_bytes // dtype.size)
        pieces = []
        offset = 0
        for i in indices:
            size = tensors[i].shape.num_elements()
            start = _align(offset, align)
            if start > offset:
                pieces.append(tf.zeros([start - offset], dtype))
            pieces.append(tf.reshape(tensors[i], [-1]))
            slots[i] = TensorSlot(p, start, size, shapes[i], dtype)
            offset = start + size
        packs.append(pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=0))
        pack_sizes.append(offset)
        pack_dtypes.append(dtype)
    spec = PackSpec(tuple(slots), tuple(pack_sizes), tuple(pack_dtypes))
    return packs, spec


def _check_packs(num_packs, spec):
    if not isinstance(spec, PackSpec):
        raise TypeError(f"Argument `spec` must be a PackSpec. Received: spec={spec!r}")
    if num_packs != spec.num_packs:
        raise ValueError(
            f"Argument `packs` must hold {spec.num_packs} packs for this spec. "
            f"Received: {num_packs} packs"
        )


def unpack(packs, spec):
    """Exact inverse of `pack`: cuts the packs back into the original tensors.

    Args:
      packs: sequence of 1-D `tf.Tensor`, as returned by `pack` (or all-reduced copies of
        them; the dtype may differ, e.g. after a reduction in float32, and is kept).
      spec: the `PackSpec` from `pack`.

    Returns:
      A list of `spec.num_tensors` tensors with the original shapes, in the original
      order.

    Raises:
      ValueError: if the number of packs does not match `spec`.
      TypeError: if `spec` is not a `PackSpec`.
    """
    packs = list(packs)
    _check_packs(len(packs), spec)
    return unpack_from_shards(
        [[(0, spec.pack_sizes[p], packs[p])] for p in range(spec.num_packs)], spec
    )


def unpack_from_shards(shards, spec):
    """Like `unpack`, but each pack is given as contiguous shards (an all-gather's output).

    A tensor that lies inside one shard is sliced and reshaped (on CPU this shares the
    shard's memory when its offset is aligned); a tensor that straddles shard boundaries
    is concatenated from its pieces. The ops run under the caller's ``tf.device`` scope.

    Args:
      shards: one entry per pack; entry ``p`` is a sequence of ``(start, end, tensor)``
        with `tensor` a 1-D `tf.Tensor` holding elements ``[start, end)`` of pack ``p``;
        the shards of a pack must be in order and cover ``[0, spec.pack_sizes[p])``
        (empty shards allowed).
      spec: the `PackSpec` from `pack`.

    Returns:
      A list of `spec.num_tensors` tensors with the original shapes, in the original
      order; dtypes are those of the shards.

    Raises:
      ValueError: if the shards do not match `spec`.
    """
    shards = [list(s) for s in shards]
    _check_packs(len(shards), spec)
    for p, pack_shards in enumerate(shards):
        expected = 0
        for start, end, _ in pack_shards:
            if start != expected or end < start:
                raise ValueError(
                    f"Argument `shards` for pack {p} must be contiguous from 0; shard "
                    f"[{start}, {end}) found where [{expected}, ...) was expected"
                )
            expected = end
        if expected != spec.pack_sizes[p]:
            raise ValueError(
                f"Argument `shards` for pack {p} covers {expected} elements; "
                f"expected {spec.pack_sizes[p]}"
            )
    outputs = []
    for slot in spec.slots:
        begin, end = slot.offset, slot.offset + slot.size
        pieces = []
        for start, stop, shard in shards[slot.pack]:
            lo, hi = max(begin, start), min(end, stop)
            if lo >= hi:
                continue
            if lo == start and hi == stop and shard.shape[0] == hi - lo:
                pieces.append(shard)
            else:
                pieces.append(shard[lo - start : hi - start])
        if not pieces:  # Empty tensor.
            dtype = shards[slot.pack][0][2].dtype if shards[slot.pack] else slot.dtype
            flat = tf.zeros([0], dtype)
        elif len(pieces) == 1:
            flat = pieces[0]
        else:
            flat = tf.concat(pieces, axis=0)
        outputs.append(tf.reshape(flat, slot.shape))
    return outputs
