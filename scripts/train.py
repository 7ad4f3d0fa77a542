r"""Trains a ResNet image classifier on ImageNet-format TFRecords across many replicas with Keras `model.fit`.

The main job of tfscale. With no flags it converts the embedded default data set (Fashion-MNIST, from Debian's
`dataset-fashion-mnist` package) once into ImageNet-format TFRecords under `--data_dir`, then trains a small ResNet on
4 replicas (logical CPU devices when there is no GPU) with tfscale's 2D-torus all-reduce, and writes
`results.json` (top-1, top-5, wall seconds, images/s and the full configuration) into `--model_dir`.

The same code path reads real ImageNet records (TPU / Model Garden keys, 1-based labels; `--label_offset=0` for
TFDS `imagenet2012` records):

  python scripts/train.py --dataset=imagenet --data_dir=/data/imagenet --model=resnet50 \
      --num_replicas=8 --global_batch_size=2048 --recipe=goyal --epochs=90

and ImageNet as TFDS prepared it (shards, 0-based labels and class count from the builder's metadata):

  python scripts/train.py --dataset=tfds:imagenet2012 --tfds_data_dir=~/tensorflow_datasets --model=resnet50

The input pipeline delivers uint8 pixels and the model normalises them in its first layer, on the accelerator
(`input_normalization`), so the saved `model.keras` predicts from raw images. `--cache` keeps the decoded images in
host memory after the first epoch (random crops and flips still change every epoch).

A killed run started again with the same `--model_dir` resumes from its last completed epoch (Keras
`BackupAndRestore`). TensorBoard logs go to `<model_dir>/logs`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import time
import warnings

# TensorFlow's C++ INFO lines (e.g. the end-of-sequence notice of every evaluation pass) and its known-harmless
# warnings are noise in a progress log: main() keeps them out (tfscale._process.quiet_tensorflow_logs) unless
# --verbosity is given; real warnings and errors still show.
# Keras warns "Your input ran out of data" at the end of every pass over a finite dataset of unknown
# cardinality, which is what the padded evaluation dataset is; the training dataset repeats forever.
warnings.filterwarnings("ignore", message="Your input ran out of data")

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS

# Per data set: image size, model and the file patterns of the records inside --data_dir.
_DATASET_DEFAULTS = {
    # base_lr 0.4 per 256 images for the 78k-parameter ResNet-8 on 28-pixel images: 0.1 (Goyal's ImageNet value)
    # learned 2-3x slower in a short run here.
    # weight_decay 5e-4 for it (5e-5 over-fitted: 93% training vs 89.6% test top-1 after 10 epochs); ImageNet uses
    # Goyal et al.'s 1e-4.
    "fashion_mnist": {"image_size": 28, "model": "resnet8", "base_lr": 0.4, "weight_decay": 5e-4},
    "imagenet": {"image_size": 224, "model": "resnet50", "base_lr": 0.1, "weight_decay": 1e-4},
}
_TRAIN_PATTERN = "train-*"
_EVAL_PATTERN = "validation-*"
_OUR_FLAGS: set[str] = set()  # the names define_flags() defines


EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by SIGTERM after backing up the current step


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite (Keras's TerminateOnNaN stopped the run)."""


def define_flags():
    """Defines the command-line flags of the training script (call once, before parsing)."""
    before = set(FLAGS)
    # Data.
    flags.DEFINE_string("dataset", "fashion_mnist",
                        "fashion_mnist: the embedded default (converted to TFRecords on first use); "
                        "imagenet: ImageNet-format TFRecords train-* and validation-* in --data_dir; "
                        "tfds:<name>: a prepared TFDS image-classification data set with JPEG images (e.g. "
                        "tfds:imagenet2012) in --tfds_data_dir, ImageNet defaults (224 px, resnet50).")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory for --dataset=tfds:<name> (default: TFDS's, "
                        "~/tensorflow_datasets or $TFDS_DATA_DIR).")
    flags.DEFINE_bool("cache", None, "Keep the decoded images in host memory after the first epoch (uint8, "
                      "height*width*3 bytes each: 141 MB for Fashion-MNIST); random crops and flips still change "
                      "every epoch. For data sets that fit in memory. Default: on for fashion_mnist (1.26x the "
                      "images/s of the default job, docs/benchmarks.md), off otherwise.")
    flags.DEFINE_string("data_dir", None,
                        "Directory of the TFRecords. Required for --dataset=imagenet; for fashion_mnist it "
                        "defaults to data/fashion_mnist and the records are built there on first use.")
    flags.DEFINE_string("fashion_mnist_source", "/usr/share/datasets/fashion-mnist",
                        "Where Debian's dataset-fashion-mnist package put the gzipped IDX files.")
    flags.DEFINE_integer("num_classes", None, "Classes (default: from the records' metadata; 1000 for imagenet "
                         "records without metadata).")
    flags.DEFINE_integer("label_offset", 1,
                         "Subtracted from the stored label: 1 for TPU/Model Garden records (1-based), "
                         "0 for TFDS imagenet2012 records (0-based). Default: the --record_keys preset's.")
    flags.DEFINE_enum("record_keys", "tpu", ["tpu", "tfds"],
                      "Preset of the record layout: tpu = TPU reference / Model Garden (--image_key=image/encoded "
                      "--label_key=image/class/label --label_offset=1); tfds = TFDS imagenet2012 (--image_key=image "
                      "--label_key=label --label_offset=0). Flags given explicitly win.")
    flags.DEFINE_string("image_key", None, "Feature key of the JPEG bytes (default: the --record_keys preset's).")
    flags.DEFINE_string("label_key", None, "Feature key of the int64 label (default: the --record_keys preset's).")
    flags.DEFINE_integer("fail_fast_records", 1000,
                         "Stop with an error (naming the files, the most common skip reason and the keys) when the "
                         "first N records of an input pipeline, or its whole first pass, yield no usable example.")
    flags.DEFINE_enum("on_damaged_file", "stop", ["stop", "count"],
                      "A truncated, corrupt or compressed TFRecord file: stop before training (naming each file "
                      "and the records readable before the damage), or count the rest of the file as lost and go "
                      "on (results.json reports the lost records and the evaluation shortfall).")
    flags.DEFINE_integer("image_size", None, "Input height and width in pixels (default: 28 for fashion_mnist, "
                         "224 for imagenet).")
    flags.DEFINE_enum("train_crop", None, ["inception", "pad_and_crop"],
                      "Training crop: inception (TPU reference: sampled box + fused decode-and-crop) or "
                      "pad_and_crop (CIFAR style). Default: pad_and_crop for fashion_mnist, inception for imagenet.")
    flags.DEFINE_integer("pad_pixels", None, "pad_and_crop: zero padding per side before the random crop, in "
                         "pixels (default 0 for fashion_mnist: random flips only; 4 is the CIFAR value).")
    flags.DEFINE_float("min_crop_area", 0.08, "Smallest fraction of the image an inception crop covers.")
    flags.DEFINE_float("central_fraction", None, "Evaluation centre-crop fraction (default: 1.0 for "
                       "fashion_mnist, 224/256 = 0.875 for imagenet).")
    flags.DEFINE_string("tf_data_service", None,
                        "grpc://host:port of a tf.data service dispatcher to run preprocessing on.")
    # Model.
    flags.DEFINE_string("model", None, "Model name (resnet8, resnet20, resnet50, ...; default: resnet8 for fashion_mnist, resnet50 for imagenet).")
    flags.DEFINE_integer("bn_group_size", None,
                         "Replicas per batch-normalisation group (Ying et al.): 1 = local BN, 0 = all replicas. "
                         "Unset: Keras's local BatchNormalization.")
    flags.DEFINE_float("bn_momentum", 0.9, "Decay of the BN moving mean and variance (0.9: the TPU and MLPerf "
                       "references; Keras's default is 0.99).")
    flags.DEFINE_enum("bn_stats", "moving_average", ["moving_average", "recompute"],
                      "recompute: after training, replace the BN moving averages by the population statistics of "
                      "--bn_stats_batches training batches (Akiba et al.); results.json then reports top-1/top-5 "
                      "with both.")
    flags.DEFINE_integer("bn_stats_batches", 50, "Training batches (of the first phase's global batch) used by "
                         "--bn_stats=recompute.")
    # Distribution.
    flags.DEFINE_integer("num_replicas", 4, "Replicas (GPUs, or logical CPU devices when there is no GPU).")
    flags.DEFINE_string("all_reduce", "torus", "Gradient all-reduce algorithm: any name of "
                        "tfscale.distribute.algorithm_names() (torus, hierarchical, halving_doubling, flat (alias "
                        "ring), and TF's reduction_to_one_device, hierarchical_copy, collective).")
    flags.DEFINE_enum("backend", "tf", ["tf", "horovod"],
                      "tf: TensorFlow's runtime (MirroredStrategy in one process, or tfscale.launch workers). "
                      "horovod: one Horovod process per replica, started by horovodrun (e.g. horovodrun -np 4 -H "
                      "localhost:4 --gloo python scripts/train.py --backend=horovod), running the same --all_reduce "
                      "schedules over Horovod process sets; needs the environment of bash tools/setup_horovod_env.sh "
                      "(TensorFlow 2.14-2.18, Horovod 0.28.1). --num_replicas is then horovodrun's -np.")
    flags.DEFINE_string("grid_shape", None, "Torus grid as ROWSxCOLS, e.g. 2x2 (default: the most square).")
    flags.DEFINE_integer("devices_per_node", None, "Devices per node for --all_reduce=hierarchical.")
    flags.DEFINE_integer("bytes_per_pack", None, "Tensor-fusion buffer size in bytes (default: 256 KiB in one "
                         "process, 32 MiB across processes).")
    flags.DEFINE_string("calibration_file", None, "--all_reduce=auto: a calibration JSON of scripts/plan_allreduce.py "
                        "--calibrate for the cost model (default: built-in links).")
    flags.DEFINE_enum("compression", "none", ["none", "fp16", "bf16", "float16", "bfloat16"],
                      "Wire compression of the all-reduce (sums stay float32): fp16 (= float16) rounds to 2**-11 and "
                      "overflows to inf above 65,504; bf16 (= bfloat16) rounds to 2**-8 with float32's range.")
    # Optimisation.
    flags.DEFINE_enum("recipe", None, ["mlperf", "mikami", "akiba", "goyal"],
                      "Sets a paper's hyperparameters together; flags given explicitly still win.")
    flags.DEFINE_integer("global_batch_size", 256, "Images per step over all replicas.")
    flags.DEFINE_string("batch_schedule", None,
                        "Batch-size control (Mikami et al.): EPOCH:GLOBAL_BATCH,... e.g. 0:4096,10:8192; "
                        "overrides --global_batch_size.")
    flags.DEFINE_integer("epochs", 12, "Training epochs.")
    flags.DEFINE_enum("optimizer", "sgd", ["sgd", "lars", "rmsprop_warmup"], "Optimizer.")
    flags.DEFINE_float("base_lr", None, "Learning rate per 256 images (linear-scaling rule, Goyal et al.); the "
                       "peak learning rate is base_lr * global_batch_size / 256. Default: 0.1 for imagenet (Goyal "
                       "et al.), 0.4 for fashion_mnist.")
    flags.DEFINE_enum("lr_schedule", "warmup_poly", ["warmup_poly", "warmup_cosine", "warmup_piecewise", "slow_start",
                                              "constant"],
                      "Learning-rate schedule.")
    flags.DEFINE_float("warmup_epochs", 1.0, "Linear learning-rate warm-up, in epochs.")
    flags.DEFINE_float("momentum", 0.9, "Momentum.")
    flags.DEFINE_float("weight_decay", None, "Weight decay (not on BN parameters or biases). Default: 1e-4 for "
                       "imagenet (Goyal et al.), 5e-4 for fashion_mnist.")
    flags.DEFINE_float("lars_eta", 0.001, "LARS trust coefficient.")
    flags.DEFINE_float("label_smoothing", 0.1, "Label smoothing (Szegedy et al.), Keras's loss.")
    # Run.
    flags.DEFINE_string("model_dir", "runs/default", "Where checkpoints, TensorBoard logs and results.json go.")
    flags.DEFINE_integer("steps_per_epoch", None, "Cap on the steps per epoch (default: all training images).")
    flags.DEFINE_integer("eval_every_epochs", 4, "Evaluate every N epochs, as MLPerf does every 4 (and always at "
                         "the end).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                      "Keras mixed-precision policy: float32, or mixed_* (float32 variables, bfloat16/float16 "
                      "compute; BN statistics and the logits stay float32). mixed_float16 wraps the optimizer in "
                      "Keras's dynamic LossScaleOptimizer.")
    flags.DEFINE_bool("jit_compile", False,
                      "Compile the training and evaluation steps with XLA (model.compile(jit_compile=True)). Not "
                      "possible with several devices in one process (MirroredStrategy): use --num_replicas=1, or "
                      "one device per worker with tfscale.launch. Off: Keras's auto (no XLA on CPU-only machines "
                      "or under several devices).")
    flags.DEFINE_string("profile_steps", None,
                        "START,END: write a TensorBoard profiler trace of training steps START to END (1-based, "
                        "counted from the start of training in this process) to <model_dir>/logs.")
    flags.DEFINE_float("startup_timeout", 300.0,
                       "Multi-worker: seconds for every worker of the cluster to join; after that this worker names "
                       "the workers that did not answer and is ended (SIGKILL: TF blocks other ways out); 0 "
                       "disables.")
    flags.DEFINE_bool("allow_config_change", False,
                      "Resume a run in --model_dir even though training-relevant flags differ from the stored "
                      "run_config.json (the differences are printed).")
    flags.DEFINE_bool("overwrite", False,
                      "Remove the previous run's results, model, backup, logs and config in --model_dir and train "
                      "from scratch (needed to re-run a finished run).")
    _OUR_FLAGS.update(set(FLAGS) - before)


# ---------------------------------------------------------------------------------------------------------------
# Derived configuration: flags are never changed after parsing; everything derived comes from here.
# ---------------------------------------------------------------------------------------------------------------

# Recipe keys that map one-to-one onto flags.
_RECIPE_FLAGS = ("optimizer", "lr_schedule", "base_lr", "warmup_epochs", "momentum", "weight_decay",
                 "label_smoothing", "lars_eta", "batch_schedule")


def dataset_kind(dataset) -> str:
    """Returns "fashion_mnist", "imagenet" or "tfds" for a --dataset value.

    Raises:
        ValueError: for any other value, naming it and the valid forms.
    """
    if dataset in _DATASET_DEFAULTS:
        return dataset
    if isinstance(dataset, str) and dataset.startswith("tfds:") and len(dataset) > len("tfds:"):
        return "tfds"
    raise ValueError(f"Flag --dataset must be one of {sorted(_DATASET_DEFAULTS)} or tfds:<name> (e.g. "
                     f"tfds:imagenet2012). Received: --dataset={dataset!r}")


def resolve_config(flags_obj) -> dict:
    """Returns the run configuration: the flags, with a `--recipe`'s values where a flag was not given explicitly,
    and the per-data-set defaults filled in.

    Raises:
        ValueError: for a missing or inconsistent flag, naming it and its value.
    """
    config = {name: flags_obj[name].value for name in sorted(_OUR_FLAGS)}
    dataset = config["dataset"]
    kind = dataset_kind(dataset)
    small = kind == "fashion_mnist"
    preset = _DATASET_DEFAULTS["imagenet" if kind == "tfds" else kind]  # TFDS sources get ImageNet's defaults
    defaults = {
        "image_size": preset["image_size"],
        "model": preset["model"],
        "base_lr": preset["base_lr"],
        "weight_decay": preset["weight_decay"],
        "train_crop": "pad_and_crop" if small else "inception",
        "pad_pixels": 0 if small else 4,
        "central_fraction": 1.0 if small else 224 / 256,
        "cache": small,  # Fashion-MNIST fits in memory; ImageNet does not
    }
    for key, value in defaults.items():
        if config[key] is None:
            config[key] = value
    if config["data_dir"] is None and kind != "tfds":
        if dataset == "imagenet":
            raise ValueError("Flag --data_dir is required with --dataset=imagenet (a directory of ImageNet-format "
                             "TFRecords named train-* and validation-*).")
        config["data_dir"] = os.path.join("data", "fashion_mnist")
    for key in ("global_batch_size", "epochs", "num_replicas", "eval_every_epochs"):
        if config[key] < 1:
            raise ValueError(f"Flag --{key} must be >= 1. Received: --{key}={config[key]}")
    config["schedule_params"], config["optimizer_params"] = {}, {}
    if config["recipe"]:
        from tfscale.optimizers import recipes

        recipe = recipes.recipe_hyperparameters(config["recipe"], config["global_batch_size"],
                                                train_epochs=config["epochs"])
        for key in _RECIPE_FLAGS:
            if not flags_obj[key].present and recipe.get(key) is not None:
                config[key] = recipe[key]
        # The recipe's extra parameters belong to its schedule and optimizer: they apply whenever the resolved
        # name is the recipe's own, also when it was given explicitly (--recipe=mlperf --optimizer=lars), and
        # never to another schedule or optimizer, which would reject them.
        if config["lr_schedule"] == recipe["lr_schedule"]:
            config["schedule_params"] = dict(recipe.get("schedule_params") or {})
        if config["optimizer"] == recipe["optimizer"]:
            config["optimizer_params"] = dict(recipe.get("optimizer_params") or {})
        config["recipe_reference"] = recipe.get("reference")
    from tfscale.data import integrity

    preset_image_key, preset_label_key, preset_offset = integrity.KEY_PRESETS[config["record_keys"]]
    config["image_key"] = preset_image_key if config["image_key"] is None else config["image_key"]
    config["label_key"] = preset_label_key if config["label_key"] is None else config["label_key"]
    if not flags_obj["label_offset"].present:
        config["label_offset"] = preset_offset
    clamp_warmup(config)
    validate_config(config)
    return config


# A warm-up as long as the run or longer (e.g. --epochs=1 with the default 1-epoch warm-up) is cut to this fraction
# of the training epochs.
WARMUP_FRACTION_WHEN_CLAMPED = 0.1


def clamp_warmup(config) -> None:
    """Shortens a warm-up that is not shorter than the run, so that short runs (`--epochs=1`) just work.

    With --lr_schedule=warmup_poly or warmup_cosine the warm-up must end before training does; when
    `config["warmup_epochs"] >= config["epochs"]` it is set to `WARMUP_FRACTION_WHEN_CLAMPED * epochs` and the change
    is logged (the original value is kept in `config["warmup_epochs_requested"]`).
    """
    warmup, epochs = config["warmup_epochs"], config["epochs"]
    if config["lr_schedule"] not in ("warmup_poly", "warmup_cosine") or not isinstance(warmup, (int, float)) \
            or not isinstance(epochs, int) or epochs < 1 or warmup < epochs:
        return
    config["warmup_epochs_requested"] = warmup
    config["warmup_epochs"] = WARMUP_FRACTION_WHEN_CLAMPED * epochs
    logging.warning("--warmup_epochs=%g is not shorter than --epochs=%d: the learning-rate warm-up is shortened to "
                    "%g epochs (%g of training).", warmup, epochs, config["warmup_epochs"],
                    WARMUP_FRACTION_WHEN_CLAMPED)


def profile_steps(config):
    """Returns --profile_steps as a `(start, end)` pair of 1-based step numbers, 0 when unset (Keras's TensorBoard
    `profile_batch`), or None when the value is malformed."""
    import re

    text = config.get("profile_steps")
    if text is None:
        return 0
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        return None
    return int(match.group(1)), int(match.group(2))


def check_jit_compile(config, strategy) -> None:
    """Fails early, naming the strategy, where --jit_compile cannot run.

    XLA compiles one device's program: under a `MirroredStrategy` with several devices in one process the compiled
    step reads variables of the other replicas' devices and fails ("Trying to access resource ... located in device
    CPU:1 from device CPU:0"), and on GPUs XLA would bypass tfscale's all-reduce.

    Raises:
        ValueError: naming --jit_compile, the strategy and its devices, and what to use instead.
    """
    if not config.get("jit_compile"):
        return
    devices = list(strategy.extended.worker_devices)
    if len(devices) > 1:
        raise ValueError(
            f"Flag --jit_compile=True cannot run under {type(strategy).__name__} with {len(devices)} devices in one "
            f"process ({devices}, --all_reduce={config['all_reduce']}): XLA compiles one device's step. Expected "
            "--num_replicas=1, or one device per worker process (python -m tfscale.launch --num_workers N), or "
            "--nojit_compile.")


def _check(ok, flag, value, expected):
    if not ok:
        raise ValueError(f"Flag --{flag} must be {expected}. Received: --{flag}={value}")


# Flags whose non-default values the Horovod backend cannot honour (each is a property of TF's runtime).
_HOROVOD_UNSUPPORTED = {"calibration_file": None}


def check_horovod_config(config) -> None:
    """Rejects the flag combinations --backend=horovod cannot run, naming the flag, its value and what works.

    Raises:
        ValueError: for an --all_reduce that is not a registered schedule (TF's own reduction_to_one_device,
            hierarchical_copy and collective, and auto, exist only on TF's runtime), or a TF-runtime-only flag.
    """
    from tfscale.distribute import algorithms

    try:
        algorithms.canonical_name(config["all_reduce"])
    except ValueError:
        raise ValueError(
            f"Flag --all_reduce={config['all_reduce']} is not available with --backend=horovod: expected one of "
            f"tfscale's schedules {list(algorithms.algorithm_names())} (or ring); TF's reduction_to_one_device, "
            "hierarchical_copy, collective and auto need --backend=tf.") from None
    _check(not config["jit_compile"], "jit_compile", config["jit_compile"],
           "False with --backend=horovod (XLA cannot compile Horovod's collectives into the step)")
    for key, default in _HOROVOD_UNSUPPORTED.items():
        _check(config[key] == default, key, config[key], "unset with --backend=horovod (it is a TF-runtime flag)")


def validate_config(config) -> None:
    """One validation pass over the whole resolved configuration, before anything is built or trained.

    Every flag with a constrained value is checked here (ranges, formats, cross-flag consistency such as the
    batch schedule's phases against --epochs), so a bad value fails in seconds instead of after training.

    Raises:
        ValueError: naming the first bad flag, its value and what was expected.
    """
    import math
    import re

    def finite(x):
        return isinstance(x, (int, float)) and math.isfinite(x)

    for key in ("global_batch_size", "epochs", "num_replicas", "eval_every_epochs", "image_size",
                "bn_stats_batches", "fail_fast_records"):
        _check(config[key] >= 1, key, config[key], ">= 1")
    _check(finite(config["startup_timeout"]) and config["startup_timeout"] >= 0, "startup_timeout",
           config["startup_timeout"], ">= 0 seconds (0 disables)")
    for key in ("num_classes", "steps_per_epoch", "devices_per_node", "bytes_per_pack"):
        _check(config[key] is None or config[key] >= 1, key, config[key], ">= 1 (or unset)")
    _check(config["num_classes"] is None or config["num_classes"] >= 2, "num_classes", config["num_classes"],
           ">= 2 (or unset)")
    _check(config["pad_pixels"] >= 0, "pad_pixels", config["pad_pixels"], ">= 0")
    _check(config["label_offset"] >= 0, "label_offset", config["label_offset"], ">= 0")
    _check(config["seed"] >= 0, "seed", config["seed"], ">= 0")
    _check(config["bn_group_size"] is None or config["bn_group_size"] >= 0, "bn_group_size",
           config["bn_group_size"], ">= 0 (or unset)")
    _check(finite(config["min_crop_area"]) and 0 < config["min_crop_area"] <= 1, "min_crop_area",
           config["min_crop_area"], "in (0, 1]")
    _check(finite(config["central_fraction"]) and 0 < config["central_fraction"] <= 1, "central_fraction",
           config["central_fraction"], "in (0, 1]")
    _check(finite(config["bn_momentum"]) and 0 <= config["bn_momentum"] < 1, "bn_momentum",
           config["bn_momentum"], "in [0, 1)")
    _check(finite(config["base_lr"]) and config["base_lr"] > 0, "base_lr", config["base_lr"], "> 0 and finite")
    _check(finite(config["momentum"]) and 0 <= config["momentum"] < 1, "momentum", config["momentum"],
           "in [0, 1)")
    _check(finite(config["weight_decay"]) and config["weight_decay"] >= 0, "weight_decay", config["weight_decay"],
           ">= 0 and finite")
    _check(finite(config["lars_eta"]) and config["lars_eta"] > 0, "lars_eta", config["lars_eta"], "> 0")
    _check(finite(config["label_smoothing"]) and 0 <= config["label_smoothing"] < 1, "label_smoothing",
           config["label_smoothing"], "in [0, 1)")
    _check(finite(config["warmup_epochs"]) and config["warmup_epochs"] >= 0, "warmup_epochs",
           config["warmup_epochs"], ">= 0")
    if config["lr_schedule"] in ("warmup_poly", "warmup_cosine"):
        _check(config["warmup_epochs"] < config["epochs"], "warmup_epochs", config["warmup_epochs"],
               f"< --epochs={config['epochs']} with --lr_schedule={config['lr_schedule']}")
    for key in ("image_key", "label_key"):
        _check(isinstance(config[key], str) and config[key].strip(), key, repr(config[key]), "a non-empty key")
    _check(config["grid_shape"] is None or re.fullmatch(r"[1-9]\d*x[1-9]\d*", config["grid_shape"]),
           "grid_shape", config["grid_shape"], "ROWSxCOLS with positive integers, e.g. 2x2")
    if config.get("backend") == "horovod":
        check_horovod_config(config)
    _check(config["tf_data_service"] is None or re.fullmatch(r"(grpc://)?[^\s:/]+:\d{1,5}", config["tf_data_service"]),
           "tf_data_service", config["tf_data_service"], "grpc://host:port")
    _check(isinstance(config["model"], str) and re.fullmatch(r"[a-z0-9_]+", config["model"]), "model",
           config["model"], "a model name such as resnet8 or resnet50")
    if config["batch_schedule"]:
        phases = []
        for part in str(config["batch_schedule"]).split(","):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
            _check(match, "batch_schedule", config["batch_schedule"], "EPOCH:GLOBAL_BATCH,... e.g. 0:4096,10:8192")
            phases.append((int(match.group(1)), int(match.group(2))))
        starts = [epoch for epoch, _ in phases]
        _check(starts[0] == 0 and starts == sorted(set(starts)), "batch_schedule", config["batch_schedule"],
               "phases starting at epoch 0, in increasing epoch order")
        _check(all(batch >= 1 for _, batch in phases), "batch_schedule", config["batch_schedule"],
               "global batches >= 1")
        _check(starts[-1] < config["epochs"], "batch_schedule", config["batch_schedule"],
               f"phases that start before --epochs={config['epochs']} (a later phase would never run)")
    _check(config.get("profile_steps") is None or profile_steps(config) is not None, "profile_steps",
           config.get("profile_steps"), "START,END with 1 <= START <= END, e.g. 10,20")
    data_dir = config["data_dir"]
    _check(data_dir is None or not (os.path.exists(data_dir) and not os.path.isdir(data_dir)), "data_dir",
           repr(data_dir),
           "a directory (this is a file)")
    model_dir = config["model_dir"]
    _check(isinstance(model_dir, str) and model_dir and not (os.path.exists(model_dir)
                                                             and not os.path.isdir(model_dir)),
           "model_dir", repr(model_dir), "a directory path (this is a file)")


# ---------------------------------------------------------------------------------------------------------------
# Pieces.
# ---------------------------------------------------------------------------------------------------------------


def prepare_data(config) -> dict:
    """Returns the file patterns, example counts and number of classes; builds the default records on first use.

    Raises:
        ValueError: if --data_dir is not a directory or holds no matching records.
        FileNotFoundError: if the Fashion-MNIST source files are missing (the message gives the fix).
    """
    import tensorflow as tf

    from tfscale import data as tdata

    if dataset_kind(config["dataset"]) == "tfds":
        from tfscale.data import tfds_source

        info = tfds_source.tfds_info(tfds_source.parse_tfds_name(config["dataset"]), config["tfds_data_dir"])
        print(f"TFDS data set {info['name']}: splits {info['train_split']!r} and {info['eval_split']!r}")
        if config["num_classes"]:
            info["num_classes"] = config["num_classes"]
        # The "file patterns" of a TFDS source are its split names, read by tfds_source.tfds_dataset.
        info["train_file_pattern"], info["eval_file_pattern"] = info["train_split"], info["eval_split"]
        info["read_records"] = functools.partial(_read_tfds, info["name"], info["data_dir"])
        return info
    data_dir = config["data_dir"]
    if config["dataset"] == "fashion_mnist":
        info = tdata.fashion_mnist.prepare_records(data_dir, source_dir=config["fashion_mnist_source"])
        if info["converted"]:
            print(f"Converted Fashion-MNIST to ImageNet-format TFRecords in {data_dir}")
        else:
            print(f"Reusing the TFRecords in {data_dir}")
        info.setdefault("label_offset", 1)
        if config["num_classes"]:
            info["num_classes"] = config["num_classes"]
        return check_record_files(info, config)
    if not os.path.isdir(data_dir):
        raise ValueError(f"Flag --data_dir={data_dir!r} is not a directory.")
    info = {"train_file_pattern": os.path.join(data_dir, _TRAIN_PATTERN),
            "eval_file_pattern": os.path.join(data_dir, _EVAL_PATTERN)}
    for split, key in (("train", "num_train_examples"), ("eval", "num_eval_examples")):
        pattern = info[f"{split}_file_pattern"]
        if not tf.io.gfile.glob(pattern):
            raise ValueError(f"Flag --data_dir={data_dir!r} holds no TFRecords matching "
                             f"{os.path.basename(pattern)!r}.")
        try:
            info[key] = tdata.count_records(pattern)
        except tf.errors.OpError:  # a damaged file without metadata: counted by the framing walk instead
            from tfscale.data import integrity

            info[key] = sum(r.num_records for r in integrity.verify_record_files(pattern))
        if info[key] == 0:
            raise ValueError(f"The TFRecords {pattern!r} in --data_dir hold no records.")
    meta = tdata.read_metadata(data_dir, "train") or {}
    info["num_classes"] = config["num_classes"] or meta.get("num_classes") or 1000
    return check_record_files(info, config)


def check_record_files(info, config) -> dict:
    """Walks every training and evaluation record file (`tfscale.data.integrity.verify_record_files`).

    A truncated, corrupt or compressed file stops the run with --on_damaged_file=stop (the default), naming each
    file and the records readable before the damage. With --on_damaged_file=count the run goes on: the rest of each
    such file is counted as lost (`lost_records`, `damaged_files` in the returned info and in results.json), and
    the counts of examples become the readable ones.

    Raises:
        ValueError: with --on_damaged_file=stop, when a file is damaged.
    """
    from tfscale.data import integrity

    info["damaged_files"], info["lost_records"] = [], 0
    for split, key in (("train", "num_train_examples"), ("eval", "num_eval_examples")):
        reports = integrity.verify_record_files(info[f"{split}_file_pattern"])
        damage = integrity.describe_damage(reports)
        if not damage:
            continue
        if config["on_damaged_file"] == "stop":
            raise ValueError("damaged TFRecord files (pass --on_damaged_file=count to go on and count the rest of "
                             "each as lost):\n  " + "\n  ".join(damage))
        readable = sum(r.num_records for r in reports)
        expected = info.get(key) or readable
        lost = max(0, expected - readable)
        for line in damage:
            print(f"WARNING: damaged TFRecord file, the rest of it is lost: {line}")
        print(f"WARNING: {split}: {readable:,} of {expected:,} records readable ({lost:,} lost).")
        info["damaged_files"] += damage
        info["lost_records"] += lost
        info[f"expected_{key}"] = expected
        info[key] = readable
    return info


def _read_tfds(name, data_dir, split, is_training, image_size, batch_size, input_context=None, label_offset=0,
               **kwargs):
    """`tfds_source.tfds_dataset` with `imagenet_dataset`'s call shape (TFDS labels are 0-based: no offset)."""
    from tfscale.data import tfds_source

    del label_offset
    # The builder's supervised keys name the image and label features; ImageNet-record key settings do not apply.
    kwargs.pop("image_key", None)
    kwargs.pop("label_key", None)
    return tfds_source.tfds_dataset(name, split, is_training, image_size, batch_size, input_context,
                                    data_dir=data_dir, **kwargs)


def norm_layer(config):
    """Returns the model's normalisation-layer factory: Keras BN without --bn_group_size, else tfscale's
    group-synchronised BN; both with --bn_momentum and epsilon 1e-5."""
    from tfscale import models
    from tfscale.models import resnet

    momentum = config["bn_momentum"]
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Flag --bn_momentum must be in [0, 1). Received: --bn_momentum={momentum}")
    if config["bn_group_size"] is None:
        return functools.partial(models.default_norm_layer, momentum=momentum)
    from tfscale.layers import DistributedBatchNormalization

    if config["bn_group_size"] < 0:
        raise ValueError(f"Flag --bn_group_size must be >= 0. Received: --bn_group_size={config['bn_group_size']}")
    return functools.partial(DistributedBatchNormalization, group_size=config["bn_group_size"] or None,
                             momentum=momentum, epsilon=resnet.DEFAULT_BN_EPSILON)


class HorovodRun:
    """What --backend=horovod needs from `tfscale.distribute.horovod`, for one process (one rank).

    Attributes:
        rank: int, this process's Horovod rank; size: int, the number of ranks (horovodrun's -np).
        all_reduce: the `tfscale.distribute.horovod.HorovodAllReduce` of --all_reduce (its schedule, fusion and
            compression).
    """

    def __init__(self, thvd, all_reduce):
        self._thvd = thvd
        self.all_reduce = all_reduce
        self.rank = all_reduce.rank
        self.size = all_reduce.num_ranks

    def input_context(self):
        """The `tf.distribute.InputContext` of this rank's input pipeline (its shard; global batch / size)."""
        import tensorflow as tf

        return tf.distribute.InputContext(num_input_pipelines=self.size, input_pipeline_id=self.rank,
                                          num_replicas_in_sync=self.size)

    def distribute_optimizer(self, optimizer):
        return self._thvd.distribute_optimizer(optimizer, self.all_reduce)

    def callbacks(self):
        return self._thvd.callbacks(self.all_reduce)

    def barrier(self):
        """Waits for every rank (an all-reduce of one number: Horovod 0.28.1's barrier is PyTorch-only)."""
        import tensorflow as tf

        self.all_reduce([tf.zeros([1])])

    def restore_only_backup(self, backup_dir):
        """A `SafeBackupAndRestore` that restores rank 0's backup and never writes (ranks other than 0)."""
        from tfscale import training

        class RestoreOnly(training.SafeBackupAndRestore):
            def _save(self, epochs_done, step=0):
                self.last_backed_up_epoch = epochs_done

            def on_train_end(self, logs=None):
                pass  # rank 0 owns the backup and deletes it

        return RestoreOnly(backup_dir)

    def work_alone(self):
        """Ends the collective part, on every rank at the same point: the BN layers stop using the other ranks and
        Horovod shuts down (a rank leaving without it would break the others' Horovod background loop)."""
        from tfscale import _cross_replica

        _cross_replica.install(None)
        self._thvd.import_horovod().shutdown()

    def devices(self):
        return [f"horovod:rank{r}" for r in range(self.size)]


def setup_horovod(config, num_replicas_given=False) -> HorovodRun:
    """Initialises Horovod with the process sets of --all_reduce (and --bn_group_size) for --backend=horovod.

    Raises:
        ValueError: if the process was not started by horovodrun/mpirun, --num_replicas contradicts the number of
            ranks, or the schedule or BN group size does not fit it.
        tfscale.distribute.horovod.HorovodUnavailableError: without Horovod (the message says how to build it).
    """
    from tfscale.distribute import horovod as thvd

    try:
        thvd.import_horovod()  # the clear error (how to install, which TF) comes first
    except thvd.HorovodUnavailableError as err:
        raise ValueError(f"Flag --backend=horovod: {err}") from None
    if not any(k in os.environ for k in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        raise ValueError("Flag --backend=horovod needs one process per replica started by horovodrun, e.g. "
                         "horovodrun -np 4 -H localhost:4 --gloo python scripts/train.py --backend=horovod")
    size = thvd.size()
    if config["num_replicas"] != size and num_replicas_given:
        raise ValueError(f"Flag --num_replicas={config['num_replicas']} contradicts horovodrun's {size} processes "
                         "(with --backend=horovod the replicas are the processes: drop --num_replicas or match -np).")
    bn_group = config["bn_group_size"] or None
    all_reduce = thvd.init(
        config["all_reduce"], grid_shape=config["grid_shape"], devices_per_node=config["devices_per_node"],
        bn_group_size=bn_group if bn_group and bn_group < size else None,
        bytes_per_pack=config["bytes_per_pack"] or thvd.HOROVOD_BYTES_PER_PACK,
        compression=None if config["compression"] == "none" else config["compression"])
    return HorovodRun(thvd, all_reduce)


def build_optimizer(config, batch_schedule, num_train_examples):
    """Builds the learning-rate schedule (in epochs, continuous across batch-size phases) and the optimizer."""
    from tfscale import optimizers

    clock = batch_schedule.steps_per_epoch_phases(num_train_examples, config["steps_per_epoch"])
    peak = optimizers.scaled_learning_rate(config["base_lr"], batch_schedule.global_batch_size(0))
    schedule = optimizers.build_learning_rate_schedule(
        config["lr_schedule"], peak, steps_per_epoch=clock, train_epochs=config["epochs"],
        warmup_epochs=config["warmup_epochs"], **config["schedule_params"])
    return optimizers.build_optimizer(
        config["optimizer"], schedule, momentum=config["momentum"], weight_decay=config["weight_decay"],
        lars_eta=config["lars_eta"], steps_per_epoch=clock, loss_scale=config.get("dtype") == "mixed_float16",
        **config["optimizer_params"])


def gradient_bytes(config) -> int:
    """Bytes of one replica's float32 gradients, for --all_reduce=auto, counted in a child process.

    The model cannot be built here before the strategy: TensorFlow must not start before the CPU is split into
    logical devices or the multi-worker runtime is configured. A child process builds it on the CPU (a few seconds).
    With --num_classes unset the class count is that of ImageNet (1000), which only changes the last layer.
    """
    import subprocess

    code = ("import sys, numpy as np; from tfscale import models; "
            "s = models.gradient_shapes(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])); "
            "print(sum(int(np.prod(x)) for x in s))")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    for key in ("TF_CONFIG", "TFSCALE_DEVICES_PER_WORKER"):
        env.pop(key, None)
    num_classes = config["num_classes"] or 1000
    out = subprocess.run([sys.executable, "-c", code, config["model"], str(num_classes), str(config["image_size"])],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    return 4 * int(out.stdout.strip().splitlines()[-1])


def run(flags_obj) -> dict:
    """Trains and evaluates; returns the results written to `<model_dir>/results.json`."""
    config = resolve_config(flags_obj)
    start = time.time()
    from tfscale.training import run_state

    run_state.check_model_dir(config["model_dir"])

    import keras
    import tensorflow as tf

    import tfscale
    from tfscale import data as tdata
    from tfscale import distribute
    from tfscale import models
    from tfscale import training

    from tfscale import launch

    hvd_run = None  # --backend=horovod: this process's HorovodRun (rank, size, all-reduce)
    if config["backend"] == "horovod":
        hvd_run = setup_horovod(config, num_replicas_given=flags_obj["num_replicas"].present)
        strategy = tf.distribute.get_strategy()  # one replica per process; the optimizer averages across ranks
        num_replicas = hvd_run.size
        multi_worker, worker_rank = False, hvd_run.rank  # Horovod's ranks are handled by hvd_run
        is_chief = hvd_run.rank == 0
    else:
        # MultiWorkerMirroredStrategy() waits for every worker without a timeout: name the missing ones instead.
        startup = launch.StartupWatchdog(config["startup_timeout"]).start()
        strategy = distribute.create_strategy(
            algorithm=config["all_reduce"],
            num_replicas=config["num_replicas"],
            grid_shape=config["grid_shape"],
            devices_per_node=config["devices_per_node"],
            bytes_per_pack=config["bytes_per_pack"],
            compression=None if config["compression"] == "none" else config["compression"],
            gradient_bytes=gradient_bytes(config) if config["all_reduce"] == "auto" else None,
            calibration_file=config["calibration_file"],
        )
        startup.stop()
        num_replicas = strategy.num_replicas_in_sync
        check_jit_compile(config, strategy)
        handle = distribute.strategy_handle(strategy)
        # Across processes (tfscale's all-reduce or --all_reduce=collective, MWMS's own): every worker trains, the
        # chief (worker 0) writes.
        multi_worker, worker_rank = getattr(handle, "num_workers", 1) > 1, getattr(handle, "worker_rank", 0)
        is_chief = worker_rank == 0
    if multi_worker:
        # TF's coordination service catches SIGTERM (preemption notice) and the worker would go on until the
        # launcher's SIGKILL; a worker stopped before training starts should stop now. From the model's compile on,
        # the PreemptionCallback below handles SIGTERM: every worker backs up the same step and stops.
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Resume only what matches: a finished run or a changed training-relevant flag stops here (every worker).
    run_state.check_resume(config["model_dir"], config, allow_config_change=config["allow_config_change"],
                           overwrite=config["overwrite"] and is_chief)
    if is_chief:
        run_state.write_run_config(config["model_dir"], config)
    if hvd_run is not None:
        print(f"Horovod rank {hvd_run.rank} of {hvd_run.size}, all-reduce {hvd_run.all_reduce.schedule.describe()}")
    else:
        print(f"{num_replicas} replicas on {list(strategy.extended.worker_devices)}, all-reduce "
              f"{config['all_reduce']}" + (f" ({distribute.strategy_handle(strategy).algorithm})"
                                            if config["all_reduce"] == "auto" else ""))
    keras.utils.set_random_seed(config["seed"])
    if hvd_run is not None and hvd_run.rank != 0:
        hvd_run.barrier()  # rank 0 converts the default data set first; the others then reuse its records
    data = prepare_data(config)
    if hvd_run is not None and hvd_run.rank == 0:
        hvd_run.barrier()
    num_classes = data["num_classes"]
    print(f"Data: {data['num_train_examples']:,} training and {data['num_eval_examples']:,} evaluation images, "
          f"{num_classes} classes")
    if not config["batch_schedule"] and config["global_batch_size"] % num_replicas:
        raise ValueError(f"Flag --global_batch_size={config['global_batch_size']} must be divisible by the number "
                         f"of replicas ({num_replicas}).")
    batch_schedule = training.BatchSizeSchedule.parse(
        config["batch_schedule"] or f"0:{config['global_batch_size']}", num_replicas=num_replicas)
    skipped = tdata.SkippedRecordCounter()  # outside strategy.scope(): one host counter for all pipelines

    read_records = data.get("read_records", tdata.imagenet_dataset)  # TFDS sources bring their own reader

    def dataset_fn(global_batch, is_training, ctx, skip_steps=0):
        ds = read_records(
            data["train_file_pattern"] if is_training else data["eval_file_pattern"],
            is_training=is_training,
            image_size=config["image_size"],
            batch_size=ctx.get_per_replica_batch_size(global_batch),
            input_context=ctx,
            label_offset=config["label_offset"],
            image_key=config["image_key"],
            label_key=config["label_key"],
            fail_fast_records=config["fail_fast_records"],
            num_classes=num_classes,
            train_crop=config["train_crop"],
            area_range=(config["min_crop_area"], 1.0),
            pad_pixels=config["pad_pixels"],
            central_fraction=config["central_fraction"],
            skip_counter=skipped,
            data_service_address=config["tf_data_service"],
            seed=config["seed"],
            # uint8 pixels; the model normalises them on the accelerator (input_normalization below).
            dtype="uint8",
            cache="decoded" if config["cache"] else None,
        )
        # Keras's label smoothing works on one-hot targets.
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
        if is_training:
            # A run resumed in the middle of an epoch drops the global steps the interrupted run had used: each
            # step takes one batch per replica of this input pipeline.
            return ds.skip(skip_steps * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)) if skip_steps else ds
        local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        return tdata.pad_eval_batches(ds, ctx.get_per_replica_batch_size(global_batch), local_replicas)

    def make_train_dataset(global_batch, skip_steps=0):
        if hvd_run is not None:  # this rank's input pipeline: its shard of the files, global_batch / size images
            return dataset_fn(global_batch, True, hvd_run.input_context(), skip_steps=skip_steps)
        return strategy.distribute_datasets_from_function(
            functools.partial(dataset_fn, global_batch, True, skip_steps=skip_steps))

    if hvd_run is not None:
        eval_ds = dataset_fn(batch_schedule.global_batch_size(0), False, hvd_run.input_context())
    else:
        eval_ds = strategy.distribute_datasets_from_function(
            functools.partial(dataset_fn, batch_schedule.global_batch_size(0), False))

    # --dtype: the policy every layer built from here on takes (the logits layer and BN keep float32 maths).
    keras.mixed_precision.set_global_policy(config["dtype"])
    with strategy.scope():
        model = models.build_model(config["model"], num_classes=num_classes, image_size=config["image_size"],
                                   norm_layer=norm_layer(config), input_normalization="imagenet")
        optimizer = build_optimizer(config, batch_schedule, data["num_train_examples"])
        if hvd_run is not None:  # average the gradients over the ranks with the --all_reduce schedule
            optimizer = hvd_run.distribute_optimizer(optimizer)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                      label_smoothing=config["label_smoothing"]),
            # Weighted, so the zero-weight padding of the evaluation set does not count (Keras's plain `metrics`
            # ignore sample weights).
            weighted_metrics=[keras.metrics.CategoricalAccuracy(name="top1"),
                              keras.metrics.TopKCategoricalAccuracy(k=5, name="top5")],
            # Off: Keras's "auto" (no XLA on CPU-only machines or under several devices).
            jit_compile=True if config["jit_compile"] else ("auto" if hvd_run is None else False),
        )
    print(f"Model {model.name}: {model.count_params():,} parameters; batch schedule {batch_schedule}")

    backup_dir = os.path.join(config["model_dir"], "backup")
    if multi_worker:  # one backup directory per worker: they must not write the same file
        backup_dir = distribute.worker_backup_dir(backup_dir, strategy)
    if hvd_run is not None and not is_chief:
        backup = hvd_run.restore_only_backup(backup_dir)  # only rank 0 writes; every rank resumes from it
    else:
        backup = training.SafeBackupAndRestore(backup_dir)  # atomic; keeps the last good epoch on NaN
    preemption = []
    if hvd_run is None:
        # Preemption, through TF's PreemptionCheckpointHandler: SIGTERM to any worker (or to this one process) makes
        # every worker back up the same step and stop (TrainingPreempted, exit 143); the same command resumes there.
        preemption = [training.PreemptionCallback(backup, getattr(strategy, "cluster_resolver", None))]
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        backup,
        *preemption,  # after the backup: it backs up the step the backup callback has just seen end
        training.ThroughputCallback(batch_schedule.global_batch_size),
        tdata.SkippedRecordsLogger(skipped),
        training.ReleaseValidationIterator(),  # else the next validation waits 12-58 s to destroy it
    ]
    if hvd_run is not None:
        # No TerminateOnNaN: a rank that stopped one step before the others would leave them waiting in the
        # all-reduce; a NaN loss (the same on every rank after averaged NaN gradients) ends at the epoch end.
        # The broadcast follows the backup's restore; rank 0 writes its backup before the metric average, so no
        # rank reads a backup that rank 0 has not finished writing.
        callbacks = [backup] + hvd_run.callbacks() + callbacks[2:]
    # Across processes: one watchdog thread aborts the collectives of a step that stalls (a dead or hung peer).
    handle = distribute.strategy_handle(strategy)  # None under --backend=horovod (the default strategy)
    watchdog = handle.callbacks() if handle is not None else []
    callbacks += watchdog
    if is_chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(config["model_dir"], "logs"),
                                                     profile_batch=profile_steps(config)))

    # Across processes, a dead worker becomes one clear error naming the collective timeout.
    failures = distribute.explain_worker_failures(strategy) if multi_worker else contextlib.nullcontext()
    with failures:
        history = training.fit_with_batch_schedule(
            model,
            make_train_dataset,
            batch_schedule,
            num_train_examples=data["num_train_examples"],
            epochs=config["epochs"],
            steps_per_epoch=config["steps_per_epoch"],
            callbacks=callbacks,
            validation_data=eval_ds,
            validation_freq=config["eval_every_epochs"],
            verbose=(1 if sys.stdout.isatty() else 2) if is_chief or hvd_run is None else 0,
        )
        losses = history.history.get("loss", [])
        if backup.diverged_epoch is not None or not all(v == v and abs(v) != float("inf") for v in losses):
            epoch = backup.diverged_epoch if backup.diverged_epoch is not None else len(losses) - 1
            kept = (f"the last good backup (epoch {backup.last_backed_up_epoch}) is kept in {backup_dir}"
                    if backup.last_backed_up_epoch else "no epoch finished with a finite loss, so there is no backup")
            raise TrainingDivergedError(
                f"the training loss became NaN or infinite in epoch {epoch + 1} (--base_lr={config['base_lr']}, "
                f"peak learning rate {config['base_lr'] * batch_schedule.global_batch_size(0) / 256:g}); training "
                f"stopped and {kept}. No model.keras or results.json was written. Lower --base_lr or lengthen "
                "--warmup_epochs; a resume with the same flags would diverge again.")
        if hvd_run is not None:
            # Every rank is here together (the last collective was the epoch's metric average): Horovod shuts down
            # on all of them at once, and rank 0 evaluates and writes alone (the weights are the same everywhere).
            hvd_run.work_alone()
            if not is_chief:
                return {"rank": hvd_run.rank, "backend": "horovod"}
        # Keras reports the mean of per-replica accuracies; count the exact top-1/top-5 over every evaluation image.
        plain_eval_ds = dataset_fn(batch_schedule.global_batch_size(0), False, tf.distribute.InputContext())
        if hvd_run is not None:
            eval_ds = plain_eval_ds  # rank 0 evaluates every image
        moving_average = None
        if config["bn_stats"] == "recompute":
            # Akiba et al.: evaluate with the population statistics, recomputed once after training with the
            # weights frozen (not inside fit: with batch-size control every phase ends a fit). The exact figures
            # with the moving averages are kept for comparison.
            moving_average = training.evaluate_top_k(model, plain_eval_ds)
            # A plain (not distributed) pipeline of whole global batches: the statistics are over all its images.
            stats_ds = dataset_fn(batch_schedule.global_batch_size(0), True, tf.distribute.InputContext())
            layers_used = tfscale.layers.recompute_batch_norm_statistics(model, stats_ds, config["bn_stats_batches"])
            print(f"Recomputed the BN statistics of {len(layers_used)} layers from "
                  f"{max(layers_used.values(), default=0):,} training images; top-1 with the moving averages "
                  f"{moving_average['top1']:.4f}")
        evaluation = model.evaluate(eval_ds, return_dict=True, verbose=0, callbacks=watchdog)
        exact = training.evaluate_top_k(model, plain_eval_ds)
    wall = time.time() - start

    def leave():
        # No watcher thread or background RPC may outlive the chief's coordination service (else every other worker
        # prints "Socket closed" tracebacks after a successful run): stop the preemption watchers, meet at a
        # barrier, and let the chief leave last.
        for callback in preemption:
            callback.close()
        if multi_worker:
            distribute.leave_cluster(strategy)

    if not is_chief:  # every worker trains and evaluates; only the chief writes
        leave()
        return {"top1": exact["top1"], "worker_rank": worker_rank}
    model.save(os.path.join(config["model_dir"], "model.keras"))

    ips = [v for v in history.history.get("images_per_second", []) if v == v]  # drop NaN
    results = {
        "top1": exact["top1"],
        "top5": exact["top5"],
        "num_evaluated": exact["num_examples"],
        # With --bn_stats=recompute, top1/top5 use the recomputed statistics and these the moving averages.
        "moving_average_top1": moving_average["top1"] if moving_average else None,
        "moving_average_top5": moving_average["top5"] if moving_average else None,
        "keras_top1": float(evaluation["top1"]),  # mean of per-replica accuracies, as Keras reports it
        "eval_loss": float(evaluation["loss"]),
        "wall_seconds": wall,
        "images_per_second": sum(ips) / len(ips) if ips else None,
        "skipped_records": skipped.result(),
        "skipped_by_reason": skipped.result_by_reason(),
        "num_eval_expected": data.get("expected_num_eval_examples", data["num_eval_examples"]),
        "eval_shortfall": data.get("expected_num_eval_examples", data["num_eval_examples"]) - exact["num_examples"],
        "lost_records": data.get("lost_records", 0),
        "damaged_files": data.get("damaged_files", []),
        "epochs_run": list(history.epoch),
        "history": history.history,
        "num_train_examples": data["num_train_examples"],
        "num_eval_examples": data["num_eval_examples"],
        "num_classes": num_classes,
        "num_replicas": num_replicas,
        # what --all_reduce=auto chose
        "all_reduce_algorithm": (hvd_run.all_reduce.algorithm if hvd_run is not None
                                 else distribute.strategy_handle(strategy).algorithm),
        "devices": (hvd_run.devices() if hvd_run is not None else list(strategy.extended.worker_devices)),
        "backend": config["backend"],
        "config": config,
        "versions": {"tfscale": tfscale.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
                     "python": platform.python_version()},
    }
    if results["eval_shortfall"]:
        print(f"WARNING: evaluated {results['num_evaluated']:,} of {results['num_eval_expected']:,} evaluation "
              f"images ({results['eval_shortfall']:,} missing: skipped or lost records); top-1/top-5 are over the "
              "evaluated ones only.")
    path = training.write_results(os.path.join(config["model_dir"], "results.json"), results)
    ips_text = f"{results['images_per_second']:,.0f}" if results["images_per_second"] else "n/a"
    print(f"top-1 {results['top1']:.4f}, top-5 {results['top5']:.4f}, {wall:.0f} s wall, {ips_text} images/s "
          f"(training); results in {path}")
    leave()
    return results


def main(_):
    from tfscale import _process

    _process.quiet_tensorflow_logs(verbose=FLAGS["verbosity"].present)  # before TensorFlow is imported
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep TF's per-step INFO lines out of the progress output
    from tfscale.data import jpeg_messages

    try:
        # libjpeg prints a line to stderr for each corrupt JPEG; those records are skipped and counted, so the lines
        # are counted too (SkippedRecordsLogger's epoch line, one summary at the end) instead of printed.
        with jpeg_messages.LibjpegMessageFilter():
            run(FLAGS)
    except (ValueError, FileNotFoundError, TrainingDivergedError) as e:  # one clear line, no deep stack trace
        sys.exit(f"train.py: error: {e}")
    except Exception as e:  # noqa: BLE001 - only the input pipeline's fail-fast error is rewritten
        from tfscale.training import backup as backup_lib

        if isinstance(e, backup_lib.TrainingPreempted):
            print(f"train.py: preempted (SIGTERM): {e}. Run the same command to resume from that step.",
                  file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        from tfscale.data import integrity

        message = integrity.explain_input_error(e)
        if message is None:
            raise
        sys.exit(f"train.py: error: {message}")


def main_and_exit(argv):
    """`main`, then an immediate exit once its output is flushed: the interpreter's own exit waits on tf.data's
    autotune threads for minutes after the results are written (`tfscale._process.exit_promptly`)."""
    from tfscale import _process

    _process.run_and_exit_promptly(main, argv)


if __name__ == "__main__":
    define_flags()
    app.run(main_and_exit)
