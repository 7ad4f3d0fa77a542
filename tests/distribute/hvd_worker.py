"""Worker of tests/distribute/test_horovod.py, run in the Horovod environment (.venv-horovod).

    horovodrun -np N -H localhost:N --gloo python hvd_worker.py allreduce OUT
    horovodrun -np 4 -H localhost:4 --gloo python hvd_worker.py fit OUT
    python hvd_worker.py reference OUT          (one process, no Horovod: the runs the 4-rank fits must equal)

Each mode writes .npz files into OUT; the test makes every assertion from them.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

RANKS = 4
GLOBAL_BATCH = 16
STEPS = 3  # per epoch
EPOCHS = 2
SHAPES = [(3, 5), (17,), (1001,), (2, 3, 4), (1,)]

# name -> (algorithm, params, optimizer, bn_group_size); all on RANKS ranks.
FIT_CASES = {
    "flat_sgd": ("flat", {}, "sgd", None),
    "torus_sgd": ("torus", {"grid_shape": "2x2"}, "sgd", None),
    "flat_lars": ("flat", {}, "lars", None),
    "torus_lars": ("torus", {"grid_shape": "2x2"}, "lars", None),
    "flat_bn2": ("flat", {}, "sgd", 2),
    "torus_bn2": ("torus", {"grid_shape": "2x2"}, "sgd", 2),
    "hierarchical_sgd": ("hierarchical", {"devices_per_node": 2}, "sgd", None),
    "halving_doubling_sgd": ("halving_doubling", {}, "sgd", None),
}

# (algorithm, params) per number of ranks, for the all-reduce check.
ALLREDUCE_CASES = {
    4: [("flat", {}), ("torus", {"grid_shape": "2x2"}), ("torus", {"grid_shape": "1x4"}),
        ("torus", {"grid_shape": "4x1"}), ("hierarchical", {"devices_per_node": 2}),
        ("hierarchical", {"devices_per_node": 2, "intra_node": "reduce"}), ("halving_doubling", {})],
    3: [("flat", {}), ("torus", {"grid_shape": "1x3"}), ("halving_doubling", {})],
    2: [("flat", {}), ("torus", {"grid_shape": "1x2"}), ("halving_doubling", {})],
}
COMPRESSIONS = [None, "fp16", "bf16"]


def case_id(algorithm, params):
    return algorithm + "".join(f"_{k}={v}" for k, v in sorted(params.items()))


def run_allreduce(out):
    import tensorflow as tf

    from tfscale.distribute import horovod as thvd

    n = thvd.size()
    cases = ALLREDUCE_CASES[n]
    groups = []
    for algorithm, params in cases:
        groups += thvd.required_groups(n, algorithm, **params)
    thvd.init_process_sets(groups)
    rank = thvd.rank()
    rng = np.random.default_rng(100 + rank)
    inputs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    inputs[2][:10] *= 1e-6  # small values (fp16 subnormal range after scaling)
    result = {f"input_{i}": x for i, x in enumerate(inputs)}
    schedules = {}
    for algorithm, params in cases:
        for compression in COMPRESSIONS:
            for small in (0, 1 << 30):  # the schedule, then its small-message variant on every pack
                if rank == 0:
                    print(f"hvd_worker allreduce: {case_id(algorithm, params)} {compression} {small}", flush=True)
                op = thvd.HorovodAllReduce(algorithm, compression=compression, small_pack_bytes=small,
                                           bytes_per_pack=2048, **params)
                key = f"{case_id(algorithm, params)}|{compression}|{'small' if small else 'large'}"
                sched = op.small_schedule if small else op.schedule
                # Roundings of a reducing phase over k ranks: Gloo adds in the wire dtype at each of its k - 1 steps.
                schedules[key] = sum(p.group_size - 1 for p in sched.phases
                                     if p.kind in ("reduce_scatter", "all_reduce", "reduce"))
                tensors = [tf.constant(x) for x in inputs]
                eager = op(tensors)
                traced = tf.function(lambda *t, op=op: op(list(t), average=True))(*tensors)
                for i, (e, t) in enumerate(zip(eager, traced)):
                    assert e.dtype == tf.float32 and e.shape == inputs[i].shape
                    result[f"{key}|sum_{i}"] = e.numpy()
                    result[f"{key}|mean_{i}"] = t.numpy()
    np.savez(os.path.join(out, f"allreduce_n{n}_rank{rank}.npz"), **result)
    if rank == 0:
        with open(os.path.join(out, f"allreduce_n{n}_phases.json"), "w") as f:
            json.dump(schedules, f)


def global_data():
    rng = np.random.default_rng(123)
    x = rng.standard_normal((STEPS * GLOBAL_BATCH, 6, 6, 3)).astype(np.float32)
    y = rng.integers(0, 5, STEPS * GLOBAL_BATCH).astype(np.int32)
    return x, y


def rank_rows(rank, ranks=RANKS):
    per = GLOBAL_BATCH // ranks
    return np.concatenate([np.arange(s * GLOBAL_BATCH + rank * per, s * GLOBAL_BATCH + (rank + 1) * per)
                           for s in range(STEPS)])


def build_model(bn_group_size):
    import keras

    from tfscale.layers import DistributedBatchNormalization

    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    if bn_group_size:
        x = DistributedBatchNormalization(group_size=bn_group_size, name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="dense")(x)
    return keras.Model(inputs, outputs)


def initial_weights(model, seed):
    rng = np.random.default_rng(seed)
    return [0.5 * rng.standard_normal(w.shape).astype(np.float32) if "variance" not in v.path
            else np.ones(w.shape, np.float32) for v, w in zip(model.weights, model.get_weights())]


def build_optimizer(kind):
    import keras

    from tfscale import optimizers

    if kind == "lars":
        return optimizers.LARS(learning_rate=0.5, momentum=0.9, weight_decay=1e-3)
    return keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)


def compile_model(model, optimizer):
    import keras

    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def run_fit(out):
    import keras
    import tensorflow as tf

    from tfscale.distribute import horovod as thvd

    n = thvd.size()
    assert n == RANKS, n
    groups = []
    for algorithm, params, _, bn in FIT_CASES.values():
        groups += thvd.required_groups(n, algorithm, bn_group_size=bn, **params)
    thvd.init_process_sets(groups)
    thvd.init("flat", bn_group_size=2)  # installs the ranks for the BN layers (sets already registered)
    rank = thvd.rank()
    x, y = global_data()
    rows = rank_rows(rank)
    result = {}
    for name, (algorithm, params, opt, bn) in FIT_CASES.items():
        if rank == 0:
            print(f"hvd_worker fit: {name}", flush=True)
        keras.utils.set_random_seed(rank)
        model = build_model(bn)
        # Rank 0 starts from the reference weights, the others from different ones: the broadcast must fix them.
        model.set_weights(initial_weights(model, 7 if rank == 0 else 1000 + rank))
        all_reduce = thvd.HorovodAllReduce(algorithm, name=name, **params)
        compile_model(model, thvd.distribute_optimizer(build_optimizer(opt), all_reduce))
        history = model.fit(x[rows], y[rows], batch_size=GLOBAL_BATCH // n, epochs=EPOCHS, shuffle=False,
                            verbose=0, callbacks=thvd.callbacks(all_reduce))
        for i, w in enumerate(model.get_weights()):
            result[f"{name}|w{i}"] = w
        result[f"{name}|loss"] = np.array(history.history["loss"])
        result[f"{name}|num_calls"] = np.array(all_reduce.num_calls)
    # The drift control: the same run with a plain optimizer (no averaging) must end with different weights.
    keras.utils.set_random_seed(0)
    model = build_model(None)
    model.set_weights(initial_weights(model, 7))
    compile_model(model, build_optimizer("sgd"))
    model.fit(x[rows], y[rows], batch_size=GLOBAL_BATCH // n, epochs=EPOCHS, shuffle=False, verbose=0)
    for i, w in enumerate(model.get_weights()):
        result[f"unaveraged|w{i}"] = w
    del tf
    np.savez(os.path.join(out, f"fit_rank{rank}.npz"), **result)


def run_reference(out):
    """One process: plain fit on the whole global batch; group BN under a MirroredStrategy of 4 logical CPUs
    with tfscale's in-process schedule (the BN groups then span replicas as they span ranks)."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * RANKS)
    import keras

    from tfscale.distribute import ScheduledAllReduce

    x, y = global_data()
    result = {}
    for name, (algorithm, params, opt, bn) in FIT_CASES.items():
        keras.utils.set_random_seed(0)
        if bn:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")][:RANKS]
            strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ScheduledAllReduce(algorithm,
                                                                                                   **params))
        else:
            strategy = tf.distribute.get_strategy()
        with strategy.scope():
            model = build_model(bn)
            model.set_weights(initial_weights(model, 7))
            compile_model(model, build_optimizer(opt))
        history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
        for i, w in enumerate(model.get_weights()):
            result[f"{name}|w{i}"] = w
        result[f"{name}|loss"] = np.array(history.history["loss"])
    np.savez(os.path.join(out, "fit_reference.npz"), **result)


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    {"allreduce": run_allreduce, "fit": run_fit, "reference": run_reference}[mode](out_dir)
    print(f"hvd_worker {mode}: done", flush=True)
