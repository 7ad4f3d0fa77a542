"""Benchmark of tfscale's one-process all-reduces against TF's built-ins.

Times one `CrossDeviceOps.batch_reduce` (SUM) of a model's gradient shapes on N local
devices (GPUs, or logical CPUs split off the host when there is no GPU) for:

* tfscale: `TorusAllReduce` (default grid), `HierarchicalAllReduce` (default
  `devices_per_node`, both intra-node modes);
* TF built-ins: `ReductionToOneDevice`, `HierarchicalCopyAllReduce(num_packs=0)` and
  ``(num_packs=1)``, and MirroredStrategy's default `CollectiveAllReduce`;
* a memory floor: the reads and the single write that any all-reduce must do when the
  devices share memory, measured two ways, of which the faster is the floor:
  ``floor_fused``, one ``tf.math.add_n`` over N already-fused buffers of the same total
  size plus an identity hop of the sum to every device; ``floor_per_tensor``, one
  ``add_n`` over the N replicas of each tensor, spread over the devices, with no copy,
  no fusion and no broadcast at all.

All are measured in the same run, interleaved repetition by repetition (so a noisy
neighbour hits all of them alike), and the median is reported with its ratio to the
fastest built-in and to the floor, both for wall time and for the process's CPU time
(``time.process_time``, all threads), which is far less sensitive to other processes
competing for the cores than wall time. The per-replica gradients are `tf.Variable`s created on
their devices once; each timed call reads them inside a `tf.function` (PerReplica values
passed as function arguments would lose their placement) and returns every reduced tensor.

Model shapes: ``resnet50`` is `tfscale.models.gradient_shapes("resnet50")` (161 trainable
tensors, 25,557,032 float32); ``small`` is a 3-conv CNN with a dense head.

Example:
  python scripts/benchmark_allreduce.py --num_devices=4,8 --models=resnet50,small \
      --reps=7 --output_json=/tmp/allreduce.json
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tfscale.planning import timing  # noqa: E402


def define_flags():
    """Defines the benchmark's flags."""
    flags.DEFINE_list("num_devices", ["4", "8"], "Replica counts to benchmark.")
    flags.DEFINE_list("models", ["resnet50", "small"], "Gradient shapes: resnet50, small.")
    flags.DEFINE_list(
        "algorithms",
        ["torus", "ring", "hierarchical", "hierarchical_reduce", "halving_doubling", "reduction_to_one_device",
         "hierarchical_copy_0", "hierarchical_copy_1", "collective", "floor_fused",
         "floor_per_tensor"],
        "Ops to time (see the module docstring): any algorithm of tfscale's registry "
        "(tfscale.distribute.algorithms), hierarchical_reduce, TF's built-ins and the floors.",
    )
    flags.DEFINE_integer("reps", 7, "Timed repetitions per op (median reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed calls per op before timing.")
    flags.DEFINE_integer(
        "bytes_per_pack", None, "Fusion threshold in bytes for tfscale ops (None: default)."
    )
    flags.DEFINE_string("compression", None, "None, fp16 or bf16 for tfscale ops.")
    flags.DEFINE_string("output_json", None, "Where to write the results as JSON.")


BUILT_INS = ("reduction_to_one_device", "hierarchical_copy_0", "hierarchical_copy_1",
             "collective")


def model_shapes(name):
    """Returns the trainable-weight shapes of model `name` ("resnet50" or "small").

    Raises:
      ValueError: for an unknown name.
    """
    import keras

    if name == "resnet50":
        from tfscale import models

        return list(models.gradient_shapes("resnet50"))
    if name == "small":
        model = keras.Sequential([
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ])
    else:
        raise ValueError(f"Argument `models` must name resnet50 or small. Received: {name!r}")
    return [tuple(int(d) for d in w.shape) for w in model.trainable_weights]


def _make_op(name, num_devices, bytes_per_pack, compression):
    import tensorflow as tf

    from tfscale.distribute import local
    from tfscale.distribute import strategy as strategy_lib

    kwargs = dict(
        bytes_per_pack=local.IN_PROCESS_BYTES_PER_PACK if bytes_per_pack is None else bytes_per_pack,
        compression=compression,
    )
    if name in strategy_lib.algorithm_names(include_builtins=False):
        return strategy_lib.create_cross_device_ops(name, num_devices, **kwargs)
    if name == "hierarchical_reduce":
        return strategy_lib.create_cross_device_ops(
            "hierarchical", num_devices, intra_node="reduce", **kwargs
        )
    if name == "reduction_to_one_device":
        return tf.distribute.ReductionToOneDevice()
    if name.startswith("hierarchical_copy_"):
        return tf.distribute.HierarchicalCopyAllReduce(num_packs=int(name.rsplit("_", 1)[1]))
    raise ValueError(f"Unknown op {name!r}")


def _build_call(name, devices, variables, flat_variables, bytes_per_pack, compression):
    """Returns a no-argument callable that runs one all-reduce (or the floor)."""
    import tensorflow as tf
    from tensorflow.python.distribute import values as values_lib

    if name == "floor_fused":

        @tf.function
        def floor_fused():
            with tf.device(devices[0]):
                total = tf.math.add_n([v.read_value() for v in flat_variables])
            outs = [total]
            for device in devices[1:]:
                with tf.device(device):
                    outs.append(tf.identity(total))
            return outs

        return floor_fused

    if name == "floor_per_tensor":

        @tf.function
        def floor_per_tensor():
            outs = []
            for i in range(len(variables[0])):
                with tf.device(devices[i % len(devices)]):
                    outs.append(tf.math.add_n([v[i].read_value() for v in variables]))
            return outs

        return floor_per_tensor

    if name == "collective":
        from tfscale import distribute
        from tfscale.distribute import strategy as strategy_lib

        # MirroredStrategy's own CollectiveAllReduce, with its own collective key range.
        strategy = strategy_lib.create_strategy("collective", num_replicas=len(devices))
        op = distribute.get_cross_device_ops(strategy)
    else:
        op = _make_op(name, len(devices), bytes_per_pack, compression)

    @tf.function
    def reduce():
        per_replica = []
        for i in range(len(variables[0])):
            values = []
            for d, device in enumerate(devices):
                with tf.device(device):
                    values.append(variables[d][i].read_value())
            per_replica.append(values_lib.PerReplica(tuple(values)))
        reduced = op.batch_reduce(
            tf.distribute.ReduceOp.SUM, [(v, v) for v in per_replica]
        )
        return [list(r.values) for r in reduced]

    return reduce


def run(flags_obj):
    """Runs the benchmark; returns ``{"results": [...], "command": ...}``."""
    import numpy as np

    from tfscale.distribute import strategy as strategy_lib

    counts = sorted({int(n) for n in flags_obj.num_devices})
    all_devices = strategy_lib.configure_logical_devices(max(counts))
    import tensorflow as tf

    results = []
    for model in flags_obj.models:
        shapes = model_shapes(model)
        num_elements = sum(int(np.prod(s)) for s in shapes)
        for n in counts:
            devices = all_devices[:n]
            rng = np.random.default_rng(0)
            variables, flat_variables = [], []
            for device in devices:
                with tf.device(device):
                    variables.append([
                        tf.Variable(rng.standard_normal(s, dtype=np.float32)) for s in shapes
                    ])
                    flat_variables.append(
                        tf.Variable(rng.standard_normal(num_elements, dtype=np.float32))
                    )
            calls = {
                name: _build_call(name, devices, variables, flat_variables,
                                  flags_obj.bytes_per_pack, flags_obj.compression)
                for name in flags_obj.algorithms
            }
            timings = timing.time_interleaved(calls, flags_obj.reps, warmup=flags_obj.warmup)
            times = timings.wall_s
            medians, cpu_medians = timings.median_ms(), timings.median_ms(cpu=True)

            def best(table, names):
                found = [table[b] for b in names if b in table]
                return min(found) if found else float("nan")

            floors = ("floor_fused", "floor_per_tensor")
            for name in calls:
                results.append({
                    "model": model,
                    "num_devices": n,
                    "num_tensors": len(shapes),
                    "num_elements": num_elements,
                    "op": name,
                    "median_ms": medians[name],
                    "min_ms": min(times[name]) * 1e3,
                    "cpu_median_ms": cpu_medians[name],
                    "ratio_to_best_built_in": medians[name] / best(medians, BUILT_INS),
                    "ratio_to_floor": medians[name] / best(medians, floors),
                    "cpu_ratio_to_best_built_in": (
                        cpu_medians[name] / best(cpu_medians, BUILT_INS)),
                    "cpu_ratio_to_floor": cpu_medians[name] / best(cpu_medians, floors),
                })
            del variables, flat_variables, calls

    print("| model | devices | op | wall median ms | wall min ms | / best built-in | / floor "
          "| CPU median ms | CPU / best built-in | CPU / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} ({r['num_tensors']} tensors, {r['num_elements'] / 1e6:.1f}M) "
              f"| {r['num_devices']} | {r['op']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} "
              f"| {r['ratio_to_best_built_in']:.2f} | {r['ratio_to_floor']:.2f} "
              f"| {r['cpu_median_ms']:.1f} | {r['cpu_ratio_to_best_built_in']:.2f} "
              f"| {r['cpu_ratio_to_floor']:.2f} |")
    out = {"results": results, "flags": {
        "num_devices": counts, "models": list(flags_obj.models),
        "algorithms": list(flags_obj.algorithms), "reps": flags_obj.reps,
        "warmup": flags_obj.warmup, "bytes_per_pack": flags_obj.bytes_per_pack,
        "compression": flags_obj.compression,
        "device_type": "GPU" if tf.config.list_physical_devices("GPU") else "CPU"},
        "load_average": timing.load_average()}
    print(f"load average (1, 5, 15 min) at the end: {out['load_average']}")
    if flags_obj.output_json:
        with open(flags_obj.output_json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(_):
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
