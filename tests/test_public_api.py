"""Guards tfscale's public surface: the names users import must stay, and be documented."""

import importlib
import inspect
import subprocess
import sys

import pytest

import tfscale

SUBPACKAGES = ["data", "distribute", "layers", "models", "optimizers", "planning", "training"]


def test_top_level_names_resolve():
    for name in tfscale.__all__:
        assert getattr(tfscale, name) is not None, name
    assert tfscale.create_strategy is tfscale.distribute.create_strategy
    assert tfscale.LARS is tfscale.optimizers.LARS


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_every_public_name_exists_and_is_documented(subpackage):
    module = importlib.import_module(f"tfscale.{subpackage}")
    assert len(set(module.__all__)) == len(module.__all__), "duplicate names in __all__"
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"tfscale.{subpackage}.{name} has no docstring"


def test_contract_names_from_the_issues():
    # Names and signatures that users' code calls.
    from tfscale import data, distribute, layers, optimizers

    assert list(inspect.signature(data.imagenet_dataset).parameters)[:6] == [
        "file_pattern", "is_training", "image_size", "batch_size", "input_context", "label_offset"]
    assert list(inspect.signature(distribute.TorusAllReduce).parameters)[:3] == [
        "grid_shape", "bytes_per_pack", "compression"]
    assert list(inspect.signature(distribute.HierarchicalAllReduce).parameters)[:3] == [
        "devices_per_node", "bytes_per_pack", "compression"]
    assert list(inspect.signature(distribute.create_strategy).parameters)[:4] == [
        "algorithm", "num_replicas", "grid_shape", "devices_per_node"]
    assert list(inspect.signature(layers.DistributedBatchNormalization).parameters)[:4] == [
        "group_size", "momentum", "epsilon", "axis"]
    assert list(inspect.signature(layers.recompute_batch_norm_statistics).parameters) == [
        "model", "dataset", "num_batches"]
    assert list(inspect.signature(optimizers.LARS).parameters)[:2] == ["learning_rate", "momentum"]
    assert list(inspect.signature(optimizers.scaled_learning_rate).parameters) == [
        "base_lr", "global_batch_size", "reference_batch"]


def test_planning_does_not_import_tensorflow():
    code = "import sys, tfscale.planning; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
