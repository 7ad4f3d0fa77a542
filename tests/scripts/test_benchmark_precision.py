"""Tests of scripts/benchmark_precision.py: the cells, flag errors and the ratio table (no training)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "benchmark_precision.py")


def _module():
    spec = importlib.util.spec_from_file_location("benchmark_precision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cells_put_float32_without_xla_first():
    bp = _module()
    assert bp.cells(["mixed_float16", "float32"], ["true", "false"]) == [
        ("float32", False), ("mixed_float16", False), ("mixed_float16", True), ("float32", True)]
    assert bp.cells(["float32"], ["false"]) == [("float32", False)]


@pytest.mark.parametrize("dtypes, jit, flag", [(["float64"], ["false"], "--dtypes"), (["float32"], ["yes"],
                                                                                         "--jit_compile")])
def test_bad_cells_name_the_flag(dtypes, jit, flag):
    with pytest.raises(ValueError, match=flag):
        _module().cells(dtypes, jit)


def test_table_ratios_are_against_the_first_row():
    bp = _module()
    rows = [dict(cell="float32", dtype="float32", jit_compile=False, images_per_second=1000.0, step_ms=256.0,
                 all=[990.0, 1000.0, 1010.0]),
            dict(cell="mixed_bfloat16 + XLA", dtype="mixed_bfloat16", jit_compile=True, images_per_second=500.0,
                 step_ms=512.0, all=[500.0])]
    text = bp.table(rows)
    assert "| float32 | off | 1,000 | 256 | 1.00x |" in text
    assert "| mixed_bfloat16 | on | 500 | 512 | 0.50x | 500 |" in text
