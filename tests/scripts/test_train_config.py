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
