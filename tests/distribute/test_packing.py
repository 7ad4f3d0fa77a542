"""Tests for tfscale.distribute.packing (tensor fusion and wire compression)."""

import numpy as np
import pytest
import tensorflow as tf

from tfscale.distribute import packing


def _tensors(rng, shapes_dtypes):
    out = []
    for shape, dtype in shapes_dtypes:
        if dtype.is_floating:
            value = rng.standard_normal(shape).astype(np.float32)
        else:
            value = rng.integers(-100, 100, shape)
        out.append(tf.constant(tf.cast(value, dtype)))
    return out


MIXED = [((3, 4), tf.float32), ((), tf.float32), ((7,), tf.float64), ((1001,), tf.float32),
         ((2, 0, 3), tf.float32), ((5, 5), tf.float16), ((1,), tf.float32), ((9,), tf.int32),
         ((4, 3, 2), tf.bfloat16), ((64,), tf.float32)]


@pytest.mark.parametrize("bytes_per_pack", [0, 1, 16, 100, 4096, 1 << 30])
def test_pack_unpack_round_trip(bytes_per_pack):
    rng = np.random.default_rng(0)
    tensors = _tensors(rng, MIXED)
    packs, spec = packing.pack(tensors, bytes_per_pack)
    assert len(packs) == spec.num_packs and spec.num_tensors == len(tensors)
    for p, dtype, size in zip(packs, spec.pack_dtypes, spec.pack_sizes):
        assert p.shape.rank == 1 and p.dtype == dtype and p.shape[0] == size
    out = packing.unpack(packs, spec)
    assert len(out) == len(tensors)
    for a, b in zip(tensors, out):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_pack_layout_one_dtype_per_pack_and_threshold():
    tensors = [tf.ones([100]), tf.ones([100], tf.float64), tf.ones([100]), tf.ones([1000]),
               tf.ones([10])]
    _, spec = packing.pack(tensors, bytes_per_pack=1000)
    # float32: [100, 100] = 800 B fit; 1000 floats (4000 B) alone; then [10].
    # float64: [100] alone. Packs follow the first appearance of each dtype.
    assert spec.pack_dtypes == (tf.float32, tf.float32, tf.float32, tf.float64)
    assert [s.pack for s in spec.slots] == [0, 3, 0, 1, 2]
    # Offsets are 64-byte aligned: the second float32 tensor starts at 112, not 100.
    assert [s.offset for s in spec.slots] == [0, 0, 112, 0, 0]
    assert spec.pack_sizes == (212, 1000, 10, 100)

    _, spec0 = packing.pack(tensors, bytes_per_pack=0)
    assert spec0.pack_dtypes == (tf.float32, tf.float64)
    assert [s.pack for s in spec0.slots] == [0, 1, 0, 0, 0]


def test_pack_padding_is_zero_and_alignment_configurable():
    tensors = [tf.fill([3], 2.0), tf.fill([5], 3.0)]
    packs, spec = packing.pack(tensors, 0)
    np.testing.assert_array_equal(packs[0].numpy(), [2, 2, 2] + [0] * 13 + [3] * 5)
    packs, spec = packing.pack(tensors, 0, alignment_bytes=1)
    np.testing.assert_array_equal(packs[0].numpy(), [2, 2, 2, 3, 3, 3, 3, 3])


def test_unpack_after_sum_matches_numpy():
    """Summing packs element-wise and unpacking equals summing the tensors (padding is 0)."""
    rng = np.random.default_rng(1)
    shapes = [((3, 5), tf.float32), ((17,), tf.float32), ((), tf.float32)]
    a, b = _tensors(rng, shapes), _tensors(rng, shapes)
    pa, spec = packing.pack(a, 64)
    pb, spec_b = packing.pack(b, 64)
    assert spec == spec_b
    out = packing.unpack([x + y for x, y in zip(pa, pb)], spec)
    for x, y, z in zip(a, b, out):
        np.testing.assert_allclose(z.numpy(), x.numpy() + y.numpy(), rtol=1e-6)


@pytest.mark.parametrize("cuts", [[0, 16, 32, 1136], [0, 500, 503, 1136], [0, 0, 1136, 1136],
                                  [0, 1, 2, 3, 1136]])
def test_unpack_from_shards(cuts):
    rng = np.random.default_rng(2)
    tensors = _tensors(rng, [((7,), tf.float32), ((30, 10), tf.float32), ((1,), tf.float32),
                             ((800,), tf.float32)])
    packs, spec = packing.pack(tensors, 0)
    assert spec.pack_sizes == (1136,)
    shards = [[(s, e, packs[0][s:e]) for s, e in zip(cuts[:-1], cuts[1:])]]
    out = packing.unpack_from_shards(shards, spec)
    for a, b in zip(tensors, out):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_unpack_errors():
    packs, spec = packing.pack([tf.ones([4]), tf.ones([4], tf.float64)], 0)
    with pytest.raises(ValueError, match="2 packs"):
        packing.unpack(packs[:1], spec)
    with pytest.raises(ValueError, match="contiguous"):
        packing.unpack_from_shards([[(0, 2, packs[0][:2]), (3, 4, packs[0][3:])],
                                    [(0, 4, packs[1])]], spec)
    with pytest.raises(ValueError, match="covers 2"):
        packing.unpack_from_shards([[(0, 2, packs[0][:2])], [(0, 4, packs[1])]], spec)
    with pytest.raises(TypeError, match="PackSpec"):
        packing.unpack(packs, "spec")


def test_pack_errors():
    with pytest.raises(ValueError, match="bytes_per_pack=-1"):
        packing.pack([tf.ones([2])], -1)
    with pytest.raises(TypeError, match="bytes_per_pack"):
        packing.pack([tf.ones([2])], 1.5)
    with pytest.raises(ValueError, match="alignment_bytes=0"):
        packing.pack([tf.ones([2])], 0, alignment_bytes=0)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def dynamic(x):
        return packing.pack([x], 0)[0]

    with pytest.raises(ValueError, match=r"tensors\[0\]"):
        dynamic.get_concrete_function()


def test_single_tensor_pack_is_not_copied():
    """A pack holding one tensor is a reshape, so no Concat op is emitted."""

    @tf.function
    def f(x, y):
        packs, _ = packing.pack([x, y], bytes_per_pack=16)
        return packs

    graph = f.get_concrete_function(tf.TensorSpec([8, 8]), tf.TensorSpec([8, 8])).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "ConcatV2" not in op_types


@pytest.mark.parametrize("value, expected", [
    (None, None), ("none", None), ("fp16", "fp16"), ("FP16", "fp16"), ("float16", "fp16"),
    ("bf16", "bf16"), ("bfloat16", "bf16")])
def test_validate_compression(value, expected):
    assert packing.validate_compression(value) == expected


@pytest.mark.parametrize("bad", ["int8", "", 16, ["fp16"]])
def test_validate_compression_lists_valid_names(bad):
    with pytest.raises(ValueError) as err:
        packing.validate_compression(bad)
    assert f"compression={bad!r}" in str(err.value) and "'fp16'" in str(err.value)


@pytest.mark.parametrize("dtype, compression, wire", [
    (tf.float32, None, tf.float32), (tf.float32, "fp16", tf.float16),
    (tf.float32, "bf16", tf.bfloat16), (tf.float64, "fp16", tf.float16),
    (tf.float16, "bf16", tf.float16), (tf.bfloat16, "fp16", tf.bfloat16),
    (tf.int32, "fp16", tf.int32)])
def test_wire_dtype_and_compress(dtype, compression, wire):
    assert packing.wire_dtype(dtype, compression) == wire
    x = tf.cast(tf.constant([1.0, 2.0, 3.0]), dtype)
    y = packing.compress(x, compression)
    assert y.dtype == wire
    z = packing.decompress(y, dtype)
    assert z.dtype == dtype
    np.testing.assert_array_equal(tf.cast(z, tf.float64).numpy(), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("compression, unit_roundoff", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_compress_round_trip_error_bound(compression, unit_roundoff):
    x = np.random.default_rng(3).standard_normal(10000).astype(np.float32)
    y = packing.decompress(packing.compress(tf.constant(x), compression), tf.float32).numpy()
    normal = np.abs(x) >= 2.0**-14  # fp16's smallest normal; below it the error is absolute.
    rel = np.abs(y - x)[normal] / np.abs(x)[normal]
    assert rel.max() <= unit_roundoff
    assert rel.max() > unit_roundoff / 4  # The cast did round.
    assert np.abs(y - x)[~normal].max(initial=0.0) <= 2.0**-25


@pytest.mark.parametrize("dtype, acc", [(tf.float16, tf.float32), (tf.bfloat16, tf.float32),
                                        (tf.float32, tf.float32), (tf.float64, tf.float64),
                                        ("int32", tf.int32)])
def test_accumulation_dtype(dtype, acc):
    assert packing.accumulation_dtype(dtype) == acc
