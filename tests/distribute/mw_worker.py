"""A tiny multi-worker program for the tests in this directory (not a test module itself).

Run under ``python -m tfscale.launch --num_workers N -- python tests/distribute/mw_worker.py
--mode=... --out_dir=...``. Modes:

* ``allreduce``: builds, on each replica ``g``, ``A_k + g * B_k`` for a few odd shapes and
  dtypes (``A_k``, ``B_k`` from `case_arrays`), all-reduces them with
  ``ReplicaContext.all_reduce(SUM)`` inside ``strategy.run`` (the path Keras ``fit``
  takes) and saves each replica's result to ``out_dir/allreduce_rank{r}.npz``.
* ``fit``: trains a small Dense+BatchNorm model with ``model.fit`` for a few steps on a
  fixed data set and saves the weights to ``out_dir/fit_rank{r}.npz``; with
  ``--num_workers_expected=0`` it runs in one process without a cluster (the reference).
  ``--tfscale_layers`` swaps in tfscale's DistributedBatchNormalization and LARS.
* ``resume``: like ``fit`` with ``BackupAndRestore`` in ``out_dir/backup``; with
  ``--die_at_epoch=E --die_rank=R`` worker R kills itself (SIGKILL) at the start of epoch E
  of the first run.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SHAPES = [(1,), (7,), (3, 5), (1001,), (17, 3, 2)]
DTYPES = ["float32", "float64", "float16"]


def case_arrays(shape, dtype, seed):
    """The two arrays A, B whose ``A + g * B`` replica ``g`` all-reduces (numpy, float64)."""
    rng = np.random.RandomState(seed)
    a = rng.uniform(-1, 1, size=shape)
    b = rng.uniform(-1, 1, size=shape)
    if dtype == "float16":  # Keep fp16 sums exact-ish: few significant bits.
        a, b = np.round(a * 8) / 8, np.round(b * 8) / 8
    return a, b


def fit_data(num_examples=64, seed=0):
    """The fixed regression data set of the fit modes: x [n, 6] float32, y [n, 2] float32."""
    rng = np.random.RandomState(seed)
    x = rng.randn(num_examples, 6).astype("float32")
    w = rng.randn(6, 2).astype("float32")
    y = (x @ w + 0.1 * rng.randn(num_examples, 2)).astype("float32")
    return x, y


def build_model(keras, tfscale_layers=False):
    """A small MLP with synchronised batch normalisation, deterministic initial weights.

    With `tfscale_layers` the BN layer is tfscale's DistributedBatchNormalization (one
    group spanning all replicas), else Keras's BatchNormalization(synchronized=True).
    """
    keras.utils.set_random_seed(1)
    if tfscale_layers:
        from tfscale.layers import DistributedBatchNormalization

        norm = DistributedBatchNormalization(momentum=0.9)
    else:
        norm = keras.layers.BatchNormalization(synchronized=True, momentum=0.9)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, use_bias=False),
        norm,
        keras.layers.Activation("relu"),
        keras.layers.Dense(2),
    ])


def build_optimizer(keras, args):
    """Momentum SGD, or tfscale's LARS with `--tfscale_layers`."""
    if args.tfscale_layers:
        from tfscale.optimizers import LARS

        return LARS(learning_rate=args.learning_rate * 20, momentum=0.9, weight_decay=1e-4, eta=0.01)
    return keras.optimizers.SGD(args.learning_rate, momentum=0.9)


def _strategy(args):
    if args.num_workers_expected == 0:
        import tensorflow as tf

        return tf.distribute.get_strategy()
    from tfscale.distribute import collective

    if args.register_toy:  # A test-only algorithm: registering it is all it takes.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _toy_algorithm  # noqa: PLC0415

        _toy_algorithm.register()
    kwargs = {} if args.small_pack_bytes < 0 else {"small_pack_bytes": args.small_pack_bytes}
    strategy = collective.create_multi_worker_strategy(
        algorithm=args.algorithm, grid_shape=args.grid_shape or None,
        devices_per_node=args.devices_per_node or None, compression=args.compression or None,
        timeout_seconds=args.timeout_seconds, bytes_per_pack=args.bytes_per_pack,
        per_collective_timeout=args.per_collective_timeout, **kwargs,
    )
    if args.runtime_all_reduce:
        from tfscale.distribute import multi_worker  # noqa: PLC0415

        multi_worker.use_all_reduce(strategy, None)
    return strategy


def _rank(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return 0 if resolver is None or resolver.task_id is None else int(resolver.task_id)


def run_allreduce(args):
    strategy = _strategy(args)
    import tensorflow as tf

    rank = _rank(strategy)
    cases = [(shape, dtype) for dtype in args.dtypes.split(",") for shape in SHAPES]
    arrays = [case_arrays(shape, dtype, seed=i) for i, (shape, dtype) in enumerate(cases)]

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            g = tf.cast(ctx.replica_id_in_sync_group, tf.float64)
            values = [
                tf.cast(tf.constant(a) + g * tf.constant(b), dtype)
                for (a, b), (_, dtype) in zip(arrays, cases)
            ]
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)

        return strategy.run(replica_fn)

    results = step()
    results = step()  # Second call: fresh instance keys, same groups.
    local = {}
    for i, value in enumerate(results):
        for d, part in enumerate(strategy.experimental_local_results(value)):
            local[f"case{i}_dev{d}"] = part.numpy().astype("float64")
    np.savez(os.path.join(args.out_dir, f"allreduce_rank{rank}.npz"), **local)
    meta = {
        "num_replicas": strategy.num_replicas_in_sync,
        "devices": list(strategy.extended.worker_devices),
        "cases": [[list(s), d] for s, d in cases],
    }
    with open(os.path.join(args.out_dir, f"allreduce_rank{rank}.json"), "w") as f:
        json.dump(meta, f)
    print(f"rank {rank}: all-reduced {len(cases)} cases on {strategy.num_replicas_in_sync} replicas")


def run_fit(args, resume=False):
    strategy = _strategy(args)
    import keras
    import tensorflow as tf

    rank = _rank(strategy)
    x, y = fit_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.global_batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    with strategy.scope():
        model = build_model(keras, args.tfscale_layers)
        model.compile(optimizer=build_optimizer(keras, args), loss="mse")
    # The multi-worker timeout: one watchdog thread instead of a timer thread per collective.
    from tfscale.distribute import strategy_handle

    handle = strategy_handle(strategy)
    callbacks = handle.callbacks() if handle is not None else []
    if resume:
        # One directory per worker: Keras 3's BackupAndRestore is not multi-worker aware
        # and two workers writing one file collide on the HDF5 lock.
        from tfscale.distribute import collective

        backup_dir = collective.worker_backup_dir(os.path.join(args.out_dir, "backup"), strategy)
        callbacks.append(keras.callbacks.BackupAndRestore(backup_dir))
        marker = os.path.join(args.out_dir, "died")

        class DieAt(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                print(f"rank {rank}: epoch {epoch} begins", flush=True)
                with open(os.path.join(args.out_dir, f"epochs_rank{rank}.txt"), "a") as f:
                    f.write(f"{epoch}\n")
                if epoch == args.die_at_epoch and rank == args.die_rank and not os.path.exists(marker):
                    open(marker, "w").close()
                    print(f"rank {rank}: killing myself at epoch {epoch} at {time.time():.3f}", flush=True)
                    os.kill(os.getpid(), 9)
                if epoch == args.hang_at_epoch and rank == args.die_rank:
                    print(f"rank {rank}: hanging at epoch {epoch} at {time.time():.3f}", flush=True)
                    time.sleep(args.hang_seconds)

            def on_train_batch_end(self, batch, logs=None):
                time.sleep(args.step_sleep)

        callbacks.append(DieAt())
    if args.num_workers_expected == 0:
        history = model.fit(ds, epochs=args.epochs, verbose=0, callbacks=callbacks)
    else:
        from tfscale.distribute import collective

        try:
            with collective.explain_worker_failures(strategy):
                history = model.fit(ds, epochs=args.epochs, verbose=0, callbacks=callbacks)
        except collective.WorkerFailureError as err:
            print(f"rank {rank}: WorkerFailureError at {time.time():.3f}: {err}", flush=True)
            sys.exit(3)
    weights = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    np.savez(os.path.join(args.out_dir, f"fit_rank{rank}.npz"), **weights)
    with open(os.path.join(args.out_dir, f"fit_rank{rank}.json"), "w") as f:
        losses = [float(v) for v in history.history.get("loss", [])]
        json.dump({"loss": losses, "replicas": strategy.num_replicas_in_sync}, f)
    print(f"rank {rank}: fit done, losses {losses}, {_thread_count()} threads", flush=True)


def _thread_count():
    """OS threads of this process (Linux), or -1 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    except (OSError, StopIteration):
        return -1


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["allreduce", "fit", "resume"], required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--algorithm", default="torus")
    parser.add_argument("--register_toy", action="store_true", help="register tests/distribute/_toy_algorithm.py first")
    parser.add_argument("--runtime_all_reduce", action="store_true",
                        help="then switch to MWMS's own all-reduce (use_all_reduce(strategy, None), auto's 'collective')")
    parser.add_argument("--grid_shape", default="")
    parser.add_argument("--devices_per_node", type=int, default=0)
    parser.add_argument("--compression", default="")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--timeout_seconds", type=float, default=60.0)
    parser.add_argument("--bytes_per_pack", type=int, default=1024)
    parser.add_argument("--small_pack_bytes", type=int, default=0,
                        help="torus/hierarchical latency-path threshold; -1: the library default (1 MiB)")
    parser.add_argument("--num_workers_expected", type=int, default=2)
    parser.add_argument("--global_batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--die_at_epoch", type=int, default=-1)
    parser.add_argument("--die_rank", type=int, default=1)
    parser.add_argument("--step_sleep", type=float, default=0.0)
    parser.add_argument("--hang_at_epoch", type=int, default=-1, help="--die_rank sleeps there instead of dying")
    parser.add_argument("--hang_seconds", type=float, default=0.0)
    parser.add_argument("--per_collective_timeout", action="store_true",
                        help="a timeout on every collective instead of the watchdog callback")
    parser.add_argument("--tfscale_layers", action="store_true",
                        help="DistributedBatchNormalization + LARS instead of Keras SyncBN + SGD")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.mode == "allreduce":
        run_allreduce(args)
    else:
        run_fit(args, resume=args.mode == "resume")


if __name__ == "__main__":
    main(sys.argv[1:])
