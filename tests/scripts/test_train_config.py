"""Unit tests of scripts/train.py's flag resolution (no training): recipes against explicit flags."""

import importlib.util
import os

import pytest
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def resolve():
    """Returns resolve(*argv) -> train.py's resolved configuration for that command line."""
    spec = importlib.util.spec_from_file_location("tfscale_train_script", os.path.join(REPO, "scripts", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.define_flags()  # once per test session, into absl's global FLAGS

    def _resolve(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train.py", *argv])
        try:
            return train.resolve_config(flags.FLAGS)
        finally:
            flags.FLAGS.unparse_flags()

    return _resolve


def test_recipe_fills_unset_flags(resolve):
    config = resolve("--recipe=mlperf", "--global_batch_size=4096", "--epochs=90")
    assert config["optimizer"] == "lars" and config["lr_schedule"] == "warmup_poly"
    assert config["base_lr"] == pytest.approx(10.0 * 256 / 4096)  # MLPerf: peak LR 10 below 16k images
    assert config["warmup_epochs"] == 5.0 and config["weight_decay"] == 1e-4
    assert config["schedule_params"] == {"power": 2.0, "end_learning_rate": 1e-4}
    assert config["optimizer_params"] == {"lars_epsilon": 0.0}
    assert config["recipe_reference"] == "arXiv:1708.03888"


def test_explicit_flags_win_and_the_recipe_keeps_its_own_parameters(resolve):
    # Naming the recipe's own optimizer and schedule explicitly keeps the recipe's parameters for them.
    config = resolve("--recipe=akiba", "--optimizer=rmsprop_warmup", "--lr_schedule=slow_start", "--epochs=9",
                     "--weight_decay=0.0")
    assert config["weight_decay"] == 0.0
    assert config["optimizer_params"]["blend_center_epochs"] == pytest.approx(1.0)  # 10 epochs x 9 / 90
    assert config["schedule_params"]["boundaries"] == pytest.approx([4.0, 7.0, 8.5])


def test_another_optimizer_or_schedule_drops_the_recipes_parameters(resolve):
    config = resolve("--recipe=akiba", "--optimizer=sgd", "--lr_schedule=warmup_cosine")
    assert config["optimizer"] == "sgd" and config["optimizer_params"] == {}
    assert config["lr_schedule"] == "warmup_cosine" and config["schedule_params"] == {}


def test_no_recipe_has_no_extra_parameters(resolve):
    config = resolve()
    assert config["recipe"] is None and config["optimizer"] == "sgd"
    assert config["optimizer_params"] == {} and config["schedule_params"] == {}
    assert config["base_lr"] == 0.4 and config["bn_momentum"] == 0.9


# Issue 18, item 6: one validation pass over every flag, before anything is built (the slow end-to-end checks that
# each fails in seconds and before any training step are in test_train_reliability.py).
BAD_VALUES = [
    ("--bn_stats_batches=0", "--bn_stats_batches"),
    ("--label_smoothing=2", "--label_smoothing"),
    ("--label_smoothing=-0.1", "--label_smoothing"),
    ("--batch_schedule=0:32,5:64", "before --epochs=3"),
    ("--batch_schedule=2:32", "starting at epoch 0"),
    ("--batch_schedule=0:32,x", "EPOCH:GLOBAL_BATCH"),
    ("--base_lr=0", "--base_lr"),
    ("--base_lr=nan", "--base_lr"),
    ("--momentum=1.5", "--momentum"),
    ("--weight_decay=-1", "--weight_decay"),
    ("--lars_eta=0", "--lars_eta"),
    ("--warmup_epochs=-1", "--warmup_epochs"),
    ("--min_crop_area=0", "--min_crop_area"),
    ("--central_fraction=1.5", "--central_fraction"),
    ("--bn_momentum=1.0", "--bn_momentum"),
    ("--bn_group_size=-1", "--bn_group_size"),
    ("--image_size=0", "--image_size"),
    ("--pad_pixels=-1", "--pad_pixels"),
    ("--num_classes=1", "--num_classes"),
    ("--steps_per_epoch=0", "--steps_per_epoch"),
    ("--eval_every_epochs=0", "--eval_every_epochs"),
    ("--num_replicas=0", "--num_replicas"),
    ("--devices_per_node=0", "--devices_per_node"),
    ("--bytes_per_pack=0", "--bytes_per_pack"),
    ("--grid_shape=2by2", "--grid_shape"),
    ("--tf_data_service=nowhere", "--tf_data_service"),
    ("--fail_fast_records=0", "--fail_fast_records"),
    ("--label_offset=-1", "--label_offset"),
    ("--seed=-1", "--seed"),
    ("--image_key=", "--image_key"),
    ("--model=ResNet 50!", "--model"),
]


@pytest.mark.parametrize("arg, message", BAD_VALUES)
def test_each_bad_value_is_rejected_by_the_validation_pass(resolve, arg, message):
    with pytest.raises(ValueError, match=message.replace("-", "\\-").replace(".", "\\.")):
        resolve("--epochs=3", arg)


def test_presets_and_explicit_keys(resolve):
    config = resolve()
    assert (config["image_key"], config["label_key"], config["label_offset"]) == (
        "image/encoded", "image/class/label", 1)
    config = resolve("--record_keys=tfds")
    assert (config["image_key"], config["label_key"], config["label_offset"]) == ("image", "label", 0)
    config = resolve("--record_keys=tfds", "--label_offset=1", "--image_key=jpeg")
    assert (config["image_key"], config["label_key"], config["label_offset"]) == ("jpeg", "label", 1)


def test_startup_timeout_must_not_be_negative(resolve):
    with pytest.raises(ValueError, match="--startup_timeout"):
        resolve("--startup_timeout=-1")
