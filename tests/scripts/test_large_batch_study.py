"""Tests of scripts/large_batch_study.py: the grid, the cell records, resuming, the report.

Most tests run the study as a user does (a subprocess) against a stand-in for train.py (`FAKE_TRAIN`, written to a
temporary directory: the same flags, `define_flags`/`resolve_config`, a results.json with a synthetic history), so
the orchestration (timeouts, divergence, partial records, stale model directories) is checked in seconds. The dry
run uses the real train.py's `resolve_config`, and one slow test runs 2 tiny cells of the real train.py.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = os.path.join(REPO, "scripts", "large_batch_study.py")

FAKE_TRAIN = r'''
"""A stand-in for scripts/train.py with the flags the study uses."""
import json
import os
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags():
    for name in ("model_dir", "recipe", "optimizer", "lr_schedule", "batch_schedule", "data_dir"):
        flags.DEFINE_string(name, None, "")
    for name in ("global_batch_size", "epochs", "seed", "eval_every_epochs", "steps_per_epoch"):
        flags.DEFINE_integer(name, None, "")
    for name in ("base_lr", "warmup_epochs", "lars_eta", "label_smoothing"):
        flags.DEFINE_float(name, None, "")


def resolve_config(f):
    c = {k: f[k].value for k in f if k in ("model_dir", "recipe", "optimizer", "lr_schedule", "batch_schedule",
                                           "global_batch_size", "epochs", "seed", "eval_every_epochs", "base_lr",
                                           "warmup_epochs", "steps_per_epoch")}
    b = c["global_batch_size"]
    if c["base_lr"] is None:
        c["base_lr"] = {"goyal": 0.1, "mlperf": 10 * 256 / b, "mikami": 0.1, "akiba": 0.1}.get(c["recipe"], 0.4)
    if c["recipe"] == "mikami" and not c["batch_schedule"]:
        c["batch_schedule"] = f"0:{b},{max(1, round(c['epochs'] / 3))}:{2 * b}"
    if c["epochs"] < 1:
        raise ValueError(f"Flag --epochs must be >= 1. Received: --epochs={c['epochs']}")
    return c


def main(_):
    c = resolve_config(FLAGS)
    b, epochs, k = c["global_batch_size"], c["epochs"], c["eval_every_epochs"]
    with open(os.environ["FAKE_TRAIN_CALLS"], "a") as f:
        f.write(os.path.basename(c["model_dir"]) + "\n")
    results_path = os.path.join(c["model_dir"], "results.json")
    if os.path.exists(results_path):
        sys.exit("train.py: error: the run in --model_dir is finished")  # as run_state.check_resume does
    behaviour = dict(x.split("=") for x in os.environ.get("FAKE_TRAIN_BEHAVIOUR", "").split(",") if x)
    what = behaviour.get(f"b{b}")
    if what == "hang":
        time.sleep(3600)
    if what == "diverge":
        sys.exit("train.py: error: the training loss became NaN or infinite in epoch 2 (--base_lr=...)")
    if what == "fail":
        raise RuntimeError("something broke")
    steps = 60000 // b
    # Validation top-1 rises by 2 points per epoch from 86%, lower for larger batches (less so with mlperf).
    penalty = (0.005 if c["recipe"] == "mlperf" else 0.01) * (b // 64)
    val = [min(0.95, 0.86 + 0.02 * e) - penalty for e in range(epochs) if (e + 1) % k == 0]
    history = {"epoch_seconds": [2.0] * epochs, "eval_seconds": [0.5 if (e + 1) % k == 0 else 0.0
                                                                  for e in range(epochs)],
               "val_top1": val, "steps_per_epoch": [steps] * epochs, "global_batch_size": [b] * epochs,
               "loss": [1.0] * epochs, "images_per_second": [1000.0] * epochs}
    os.makedirs(c["model_dir"], exist_ok=True)
    results = {"top1": val[-1] if val else 0.5, "top5": 0.99, "wall_seconds": 2.0 * epochs + 1,
               "images_per_second": 1000.0, "history": history, "epochs_run": list(range(epochs)), "config": c}
    with open(results_path, "w") as f:
        json.dump(results, f)
    print(f"top-1 {results['top1']:.4f}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
'''


def _load_study():
    spec = importlib.util.spec_from_file_location("large_batch_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


study = _load_study()


@pytest.fixture
def fake(tmp_path):
    """Paths and an environment for running the study against FAKE_TRAIN in tmp_path."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = dict(os.environ, FAKE_TRAIN_CALLS=str(calls), TF_CPP_MIN_LOG_LEVEL="2")
    base = [f"--train_script={script}", f"--study_dir={tmp_path / 'study'}", f"--doc_path={tmp_path / 'doc.md'}",
            "--load_sample_seconds=0.2"]
    return {"script": str(script), "calls": calls, "env": env, "base": base, "dir": tmp_path}


def _study(args, env=None, timeout=300):
    return subprocess.run([sys.executable, STUDY, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env or dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _calls(fake):
    return fake["calls"].read_text().split()


def _small(fake, *extra):
    """Two cells: naive at batches 64 and 128, E = 3, no seeds, no tuning, no baseline check."""
    return [*fake["base"], "--batches=64,128", "--recipes=naive", "--baseline_batch=64", "--epochs=3", "--seeds=1",
            "--tuning_budget=1", "--nobaseline_check", *extra]


# ---------------------------------------------------------------------------------------------------------------
# The grid and --dry_run.
# ---------------------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_default_grid_and_runs_nothing(tmp_path):
    """The default grid through the real train.py's resolve_config: 25 grid cells, the 2E check, 2 baseline seeds,
    8 ablations of mlperf at 4096, 3 tuning LRs x 5 recipes at 8192, 2 seeds of the best at 4096; commands and the
    estimate; nothing written."""
    study_dir = tmp_path / "study"
    proc = _study(["--dry_run", f"--study_dir={study_dir}", f"--doc_path={tmp_path / 'doc.md'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    ids = re.findall(r"^\s*\d+\. (\S+)", out, re.M)
    assert len(ids) == 53 and len(set(ids)) == 53
    for batch in (256, 1024, 2048, 4096, 8192):
        for recipe in ("naive", "goyal", "mlperf", "mikami", "akiba"):
            assert f"b{batch}-{recipe}-e30-s0" in ids
    assert "b256-naive-e60-s0" in ids  # the convergence check at 2E
    assert {"b256-naive-e30-s1", "b256-naive-e30-s2", "b4096-BEST-e30-s1", "b4096-BEST-e30-s2"} <= set(ids)
    assert sum(1 for i in ids if re.fullmatch(r"b8192-\w+-lr[0-9.]+x-e30-s0", i)) == 15
    assert [i for i in ids if "+" in i] == ["b4096-mlperf+lr2x-e30-s0", "b4096-mlperf+cosine-e30-s0",
                                            "b4096-mlperf+warmup5-e30-s0", "b4096-mlperf+lr2x_cosine-e30-s0",
                                            "b4096-mlperf+lr2x_cosine_warmup5-e30-s0",
                                            "b4096-mlperf+lr4x_cosine-e30-s0", "b4096-mlperf+lr2x_cosine_ls0-e30-s0",
                                            "b4096-mlperf+lr2x_cosine_eta2x-e30-s0"]
    assert re.search(r"b4096-mlperf\+lr2x-e30-s0 +ablation +peak LR 20 ", out)  # resolved by train.py
    assert "--eval_every_epochs=1 --recipe=mlperf --warmup_epochs=5\n" in out
    # Each cell is a train.py command with its own model_dir; the recipes map to train.py's flags.
    assert f"--model_dir={study_dir}/cells/b4096-mlperf-e30-s0 --global_batch_size=4096 --epochs=30 --seed=0 " \
           "--eval_every_epochs=1 --recipe=mlperf" in out
    assert "--model_dir=" + f"{study_dir}/cells/b1024-naive-e30-s0 --global_batch_size=1024 --epochs=30 --seed=0 " \
           "--eval_every_epochs=1 --optimizer=sgd --lr_schedule=warmup_poly --warmup_epochs=0" in out
    # Tuning: the recipe's own base LR (train.py's resolve_config) times the factor: naive 0.4 x 0.25, MLPerf's
    # 10 at 8192 is 0.3125 per 256 images, x 0.5.
    assert re.search(r"b8192-naive-lr0\.25x-e30-s0 .*peak LR 3\.2 ", out)
    assert "b8192-naive-lr0.25x-e30-s0 --global_batch_size=8192" in out and "--base_lr=0.1\n" in out
    assert "--recipe=mlperf --base_lr=0.15625" in out
    match = re.search(r"Estimated wall time: ([0-9.]+) h .* for 53 cells \(over the 6 h target\)", out)
    assert match and float(match.group(1)) > 6
    assert not study_dir.exists() and not (tmp_path / "doc.md").exists()


def test_quick_dry_run_is_four_cells_within_an_hour(fake):
    proc = _study(["--dry_run", "--quick", *fake["base"]], env=fake["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = re.findall(r"^\s*\d+\. (\S+)", proc.stdout, re.M)
    assert ids == ["b256-naive-e10-s0", "b256-mlperf-e10-s0", "b4096-naive-e10-s0", "b4096-mlperf-e10-s0"]
    hours = float(re.search(r"Estimated wall time: ([0-9.]+) h", proc.stdout).group(1))
    assert hours <= 1.0 and "(within the 1 h target)" in proc.stdout
    assert _calls(fake) == []  # nothing trained


def test_grid_counts_and_best_seed_placeholders():
    settings = _settings()
    cells = study.grid_cells(settings)
    assert [c.cell_id for c in cells[:2]] == ["b256-naive-e30-s0", "b256-goyal-e30-s0"]
    tuning = study.tuning_cells(settings, {r: 0.1 for r in settings.recipes})
    assert len(tuning) == 15 and {c.lr_factor for c in tuning} == {0.25, 0.5, 2.0}
    assert tuning[0].train_args(settings)[-1] == "--base_lr=0.025"
    # A tuning budget of 2 keeps only the first factor.
    assert study.Settings.used_tuning_factors.fget(_settings(tuning_budget=2)) == (0.25,)
    assert [c.cell_id for c in study.best_seed_cells(settings, None)] == ["b4096-BEST-e30-s1", "b4096-BEST-e30-s2"]
    assert [c.cell_id for c in study.best_seed_cells(settings, "mlperf")] == ["b4096-mlperf-e30-s1",
                                                                            "b4096-mlperf-e30-s2"]


@pytest.mark.parametrize("args, message", [
    (["--train_flag=--epochs=3"], "Flag --train_flag may not set --epochs"),
    (["--batches=256,abc"], "Flag --batches must be a comma-separated list of integers"),
    (["--recipes=naive,sgd"], "Flag --recipes must list distinct names from"),
    (["--baseline_batch=512"], "Flag --baseline_batch must be one of --batches"),
    (["--tuning_budget=0"], "Flag --tuning_budget must be >= 1"),
    (["--targets=91"], "Flag --targets must be top-1 fractions in (0, 1]"),
    (["--ablation=warmup5 --warmup_epochs=5"], "Flag --ablation must be 'NAME: TRAIN_FLAGS'"),
    (["--ablation=w: --epochs=3"], "Flag --ablation may not set --epochs"),
    (["--ablation=w: warmup=5"], "Flag --ablation's train.py flags must be like --name=value"),
    (["--ablation=w: --warmup_epochs=5", "--ablation=w: --lars_eta=0.002"], "Flag --ablation names must be distinct"),
    (["--recipes=naive,goyal", "--ablation=w: --warmup_epochs=5"], "Flag --ablation_recipe must be one of --recipes"),
    (["--ablation_batch=512"], "Flag --ablation_batch must be one of --batches"),
])
def test_bad_flags_name_the_flag_and_the_value(fake, args, message):
    proc = _study(["--dry_run", *fake["base"], *args], env=fake["env"])
    assert proc.returncode != 0
    assert message in proc.stderr and "Received:" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Records and resuming (against the stand-in train.py).
# ---------------------------------------------------------------------------------------------------------------


def test_runs_cells_writes_records_and_doc_and_skips_them_on_rerun(fake):
    proc = _study(_small(fake), env=fake["env"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _calls(fake) == ["b64-naive-e3-s0", "b128-naive-e3-s0"]
    results = fake["dir"] / "data" / "doc"
    record = json.loads((results / "b64-naive-e3-s0.json").read_text())
    assert record["status"] == "ok" and record["complete"] is True
    assert record["top1"] == pytest.approx(0.89) and record["top5"] == 0.99
    assert record["steps"] == 3 * (60000 // 64) and record["images_per_second"] == 1000.0
    # Validation 0.85, 0.87, 0.89 after epochs 1-3, each 2.0 - 0.5 training seconds: 90% and 91% never reached.
    assert record["time_to_target"] == {"0.9": None, "0.91": None}
    assert record["val_top1_by_epoch"] == [[1, pytest.approx(0.85), 1.5], [2, pytest.approx(0.87), 3.0],
                                           [3, pytest.approx(0.89), 4.5]]
    assert len(record["loadavg_start"]) == 3 and len(record["loadavg_end"]) == 3
    assert isinstance(record["loaded"], bool) and record["load_threshold"] == 0.5
    assert record["peak_learning_rate"] == pytest.approx(0.4 * 64 / 256)
    summary = json.loads((fake["dir"] / "study" / "study.json").read_text())
    assert set(summary["cells"]) == {"b64-naive-e3-s0", "b128-naive-e3-s0"}
    doc = (fake["dir"] / "doc.md").read_text()
    assert "| naive | 89.00 | 88.00 |" in doc  # the table: recipe x batch
    assert "critical batch" in doc and "nothing has been measured" not in doc
    assert (fake["dir"] / "doc_top1_vs_batch.png").stat().st_size > 1000
    assert (fake["dir"] / "doc_val_top1_b128.png").stat().st_size > 1000
    command = next(line for line in doc.splitlines() if line.startswith("python scripts/large_batch_study.py "))
    assert {"--batches=64,128", "--epochs=3", "--nobaseline_check", "--recipes=naive"} <= set(command.split())
    mtimes = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}

    rerun = _study(_small(fake), env=fake["env"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cells: 0 run, 2 skipped (finished), 0 failed" in rerun.stdout
    assert _calls(fake) == ["b64-naive-e3-s0", "b128-naive-e3-s0"]  # not run again
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == mtimes


def test_ablation_cells_run_beside_the_recipe_and_stay_out_of_its_table(fake):
    """--ablation cells: the recipe's flags plus the variant's, their own ids, records and doc table (against the
    recipe's own cell); they do not count in the recipe x batch table. A grid without --ablation_recipe (the
    default mlperf) runs no default ablation."""
    args = [*fake["base"], "--batches=64", "--recipes=mlperf", "--baseline_batch=64", "--baseline_recipe=mlperf",
            "--epochs=3", "--seeds=1", "--tuning_budget=1", "--nobaseline_check", "--ablation_batch=64",
            "--ablation=w2: --warmup_epochs=2", "--ablation=lr: --base_lr=1.25"]
    proc = _study([*args, "--cells=."], env=fake["env"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _calls(fake) == ["b64-mlperf-e3-s0", "b64-mlperf+w2-e3-s0", "b64-mlperf+lr-e3-s0"]
    record = json.loads((fake["dir"] / "data" / "doc" / "b64-mlperf+w2-e3-s0.json").read_text())
    assert record["role"] == "ablation" and record["variant"] == "w2" and record["variant_flags"] == [
        "--warmup_epochs=2"]
    assert record["train_args"][-2:] == ["--recipe=mlperf", "--warmup_epochs=2"]
    doc = (fake["dir"] / "doc.md").read_text()
    assert "## Ablations (mlperf at batch 64, 3 epochs, seed 0)" in doc
    assert "| w2 | `--warmup_epochs=2` | 89.50% | +0.00 |" in doc  # the stand-in ignores the warm-up
    assert "| lr | `--base_lr=1.25` | 89.50% | +0.00 |" in doc
    assert "| mlperf | 89.50 |" in doc  # one seed: the ablations are not averaged into the recipe's figure
    # The regenerate command is the whole study: each ablation once, no --cells selection.
    command = next(line for line in doc.splitlines() if line.startswith("python scripts/large_batch_study.py "))
    assert "'--ablation=w2: --warmup_epochs=2' '--ablation=lr: --base_lr=1.25'" in command
    assert "--cells" not in command
    # The default ablations need mlperf at 4096: none in this small naive grid.
    dry = _study(["--dry_run", *_small(fake)], env=fake["env"])
    assert dry.returncode == 0 and "+" not in "".join(re.findall(r"^\s*\d+\. (\S+)", dry.stdout, re.M))


def test_cell_results_live_beside_the_doc_so_a_fresh_clone_skips_finished_cells(fake):
    """The cell JSONs default to <doc dir>/data/<doc name> (committed with the doc); the study directory (model
    directories, logs) can be lost, as on a new machine, and the finished cells are still skipped."""
    assert _study(_small(fake), env=fake["env"]).returncode == 0
    assert sorted(p.name for p in (fake["dir"] / "data" / "doc").iterdir()) == ["b128-naive-e3-s0.json",
                                                                                "b64-naive-e3-s0.json"]
    assert not (fake["dir"] / "study" / "results").exists()
    shutil.rmtree(fake["dir"] / "study")
    proc = _study(_small(fake), env=fake["env"])
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "cells: 0 run, 2 skipped (finished), 0 failed" in proc.stdout
    assert _calls(fake) == ["b64-naive-e3-s0", "b128-naive-e3-s0"]
    # --results_dir puts them elsewhere (and then nothing is finished there).
    proc = _study(_small(fake, f"--results_dir={fake['dir'] / 'other'}"), env=fake["env"])
    assert "cells: 2 run, 0 skipped" in proc.stdout
    assert (fake["dir"] / "other" / "b64-naive-e3-s0.json").exists()


def test_partial_record_is_rerun_from_a_clean_model_dir(fake):
    assert _study(_small(fake), env=fake["env"]).returncode == 0
    results = fake["dir"] / "data" / "doc"
    partial = results / "b128-naive-e3-s0.json"
    partial.write_text(partial.read_text()[:100])  # a cut-off JSON
    # The model_dir still holds the old results.json; the fake train.py, like train.py, refuses a finished run,
    # so the rerun only succeeds if the study deleted the directory first.
    assert (fake["dir"] / "study" / "cells" / "b128-naive-e3-s0" / "results.json").exists()
    proc = _study(_small(fake), env=fake["env"])
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "cells: 1 run, 1 skipped (finished), 0 failed" in proc.stdout
    assert _calls(fake) == ["b64-naive-e3-s0", "b128-naive-e3-s0", "b128-naive-e3-s0"]
    assert json.loads(partial.read_text())["status"] == "ok"
    # A record made with other train.py arguments is stale: --train_flag changes every cell's command.
    proc = _study(_small(fake, "--train_flag=--data_dir=/elsewhere"), env=fake["env"])
    assert "cells: 2 run, 0 skipped" in proc.stdout


def test_hang_times_out_divergence_is_a_result_and_failures_are_retried(fake):
    env = dict(fake["env"], FAKE_TRAIN_BEHAVIOUR="b128=hang,b256=diverge,b512=fail")
    args = [*fake["base"], "--batches=64,128,256,512", "--recipes=naive", "--baseline_batch=64", "--epochs=2",
            "--seeds=1", "--tuning_budget=1", "--nobaseline_check", "--cell_timeout_seconds=3"]
    proc = _study(args, env=env)
    assert proc.returncode == 1  # failed cells: the study says so in its exit status
    assert "2 cell(s) failed or timed out: b128-naive-e2-s0, b512-naive-e2-s0" in proc.stderr
    results = fake["dir"] / "data" / "doc"
    records = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
    assert records["b64-naive-e2-s0"]["status"] == "ok"
    assert records["b128-naive-e2-s0"]["status"] == "timeout" and not records["b128-naive-e2-s0"]["complete"]
    assert records["b128-naive-e2-s0"]["wall_seconds"] < 60
    assert records["b256-naive-e2-s0"]["status"] == "diverged" and records["b256-naive-e2-s0"]["complete"]
    assert records["b512-naive-e2-s0"]["status"] == "failed" and "something broke" in \
        records["b512-naive-e2-s0"]["error_tail"]
    doc = (fake["dir"] / "doc.md").read_text()
    assert "| naive | 87.00 | — | diverged | — |" in doc
    # The rerun retries the timed-out and failed cells only (the hang is gone now).
    rerun = _study(args, env=dict(fake["env"], FAKE_TRAIN_BEHAVIOUR="b256=diverge"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "cells: 2 run, 2 skipped (finished), 0 failed" in rerun.stdout
    assert _calls(fake)[-2:] == ["b128-naive-e2-s0", "b512-naive-e2-s0"]


def test_best_seed_cells_follow_the_best_recipe(fake):
    """With 2 seeds: the baseline's seed 1, then the best recipe at --seed_batch once its grid cells have finished
    (mlperf at 128: the fake penalises it less)."""
    args = [*fake["base"], "--batches=64,128", "--recipes=naive,mlperf", "--baseline_batch=64", "--seed_batch=128",
            "--epochs=2", "--seeds=2", "--tuning_budget=1", "--nobaseline_check"]
    proc = _study(args, env=fake["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = _calls(fake)
    assert calls[:5] == ["b64-naive-e2-s0", "b64-mlperf-e2-s0", "b128-naive-e2-s0", "b128-mlperf-e2-s0",
                         "b64-naive-e2-s1"]
    assert calls[5:] == ["b128-mlperf-e2-s1"]
    doc = (fake["dir"] / "doc.md").read_text()
    assert "(2 seeds)" in doc
    dry = _study(["--dry_run", *args], env=fake["env"])
    assert calls[5] in dry.stdout and "BEST" not in dry.stdout and dry.stdout.count("[finished]") == 6


def test_report_only_with_nothing_finished_says_so(fake):
    proc = _study([*fake["base"], "--report_only"], env=fake["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = (fake["dir"] / "doc.md").read_text()
    assert "## Status: nothing has been measured yet" in doc
    assert "cannot fit the 6-hour target" in doc
    assert not list(fake["dir"].glob("*.png"))
    assert _calls(fake) == []


# ---------------------------------------------------------------------------------------------------------------
# Pure functions.
# ---------------------------------------------------------------------------------------------------------------


def _settings(**overrides):
    values = dict(batches=(256, 1024, 2048, 4096, 8192), recipes=tuple(study.RECIPES), epochs=30,
                  baseline_check=True, baseline_batch=256, baseline_recipe="naive", seeds=3, seed_batch=4096,
                  tuning_budget=4, tuning_factors=(0.25, 0.5, 2.0), eval_every_epochs=1, targets=(0.9, 0.91),
                  train_flags=(), study_dir="s", doc_path="d.md", train_script="t.py", cells_regex=None, quick=False,
                  cell_timeout_seconds=0.0, load_threshold=0.5, load_sample_seconds=5.0,
                  estimate_epoch_seconds=((256, 52.0), (4096, 72.0)), estimate_eval_seconds=5.0,
                  estimate_cell_overhead_seconds=60.0, rerun_loaded=False, results_dir="r")
    values.update(overrides)
    return study.Settings(**values)


def test_validation_curve_every_k_epochs_and_time_to_targets():
    history = {"epoch_seconds": [10.0, 12.0, 10.0, 12.0], "eval_seconds": [0.0, 2.0, 0.0, 2.0],
               "val_top1": [0.895, 0.912], "steps_per_epoch": [7, 7, 7, 7]}
    curve = study.validation_curve(history, 2)
    assert curve == [(2, 0.895, 20.0), (4, 0.912, 40.0)]
    hits = study.time_to_targets(curve, (0.9, 0.91), history)
    assert hits == {"0.9": {"epoch": 4, "seconds": 40.0, "steps": 28}, "0.91": {"epoch": 4, "seconds": 40.0,
                                                                                  "steps": 28}}
    # Without eval_seconds, the validated epochs follow --eval_every_epochs; a count mismatch gives no curve.
    del history["eval_seconds"]
    assert [e for e, _, _ in study.validation_curve(history, 2)] == [2, 4]
    assert study.validation_curve(history, 1) == []


def _record(recipe, batch, top1, seed=0, role="grid", lr_factor=1.0, epochs=30, status="ok"):
    cell = study.Cell(recipe, batch, epochs, seed, role, lr_factor)
    return {"cell_id": cell.cell_id, "recipe": recipe, "global_batch_size": batch, "epochs": epochs, "seed": seed,
            "role": role, "lr_factor": lr_factor, "status": status, "top1": top1}


def test_analysis_critical_batch_goals_and_convergence():
    settings = _settings(batches=(256, 1024, 4096, 8192), recipes=("naive", "mlperf"), seeds=3)
    records = [_record("naive", 256, 0.930), _record("naive", 256, 0.928, seed=1, role="baseline_seed"),
               _record("naive", 256, 0.932, seed=2, role="baseline_seed"),
               _record("naive", 256, 0.931, epochs=60, role="baseline_check"),
               _record("naive", 1024, 0.925), _record("naive", 4096, 0.89), _record("naive", 8192, None,
                                                                                    status="diverged"),
               _record("mlperf", 256, 0.929), _record("mlperf", 1024, 0.927), _record("mlperf", 4096, 0.924),
               _record("mlperf", 4096, 0.922, seed=1, role="best_seed"), _record("mlperf", 8192, 0.90),
               _record("mlperf", 8192, 0.921, role="tuning", lr_factor=0.5),
               _record("naive", 8192, 0.80, role="tuning", lr_factor=0.25)]
    analysis = study.analyse(settings, records)
    assert analysis["baseline"] == pytest.approx(0.930) and analysis["baseline_n"] == 3
    assert analysis["baseline_spread"] == pytest.approx(0.002)
    mlperf_4096 = analysis["entries"][("mlperf", 4096)]
    assert mlperf_4096["mean"] == pytest.approx(0.923) and mlperf_4096["n"] == 2
    # At the largest batch the best tuned LR counts: mlperf 92.1% (x0.5) is within 1.0 point of 93.0%.
    assert analysis["entries"][("mlperf", 8192)]["tuned"] and analysis["entries"][("mlperf", 8192)]["lr_factor"] == 0.5
    assert analysis["critical_batch"] == {"naive": 1024, "mlperf": 8192}
    assert analysis["convergence"]["converged"] and analysis["convergence"]["difference_points"] == pytest.approx(0.1)
    verdicts = study.goals(settings, analysis)
    assert verdicts[0][2] == "met" and "8x" in verdicts[0][1]
    assert verdicts[1][2] == "met"  # mlperf 0.7 below, naive 4.0 below at 4096
    assert verdicts[1][1] == "mlperf 0.70 points below the baseline, naive 4.00 points below"
    tuning = analysis["entries"][("naive", 8192)]["tuning"]
    assert [(t["lr_factor"], t["status"]) for t in tuning] == [(0.25, "ok"), (1.0, "diverged")]
    # An ablation of mlperf at 4096 (better than its seeds) changes neither the entry nor the goals.
    variant = study.Cell("mlperf", 4096, 30, 0, "ablation", variant="lr2x", variant_flags=("--base_lr=1.25",))
    ablation = {**_record("mlperf", 4096, 0.95), "cell_id": variant.cell_id, "role": "ablation", "variant": "lr2x"}
    settings = study.dataclasses.replace(settings, ablations=(("lr2x", ("--base_lr=1.25",)),))
    again = study.analyse(settings, records + [ablation])
    assert again["entries"][("mlperf", 4096)]["mean"] == pytest.approx(0.923)
    assert [(r["name"], r["record"]["top1"]) for r in again["ablations"]["rows"]] == [("lr2x", 0.95)]
    assert again["ablations"]["reference"]["top1"] == 0.924


def test_summary_keeps_the_last_epoch_training_top1():
    history = {"epoch_seconds": [10.0, 10.0], "val_top1": [0.8, 0.9], "steps_per_epoch": [5, 5],
               "top1": [0.7, float("nan"), 0.917]}
    summary = study.summarize_results({"top1": 0.9, "history": history}, _settings(), 256)
    assert summary["train_top1_last_epoch"] == 0.917 and summary["steps"] == 10
    assert study.summarize_results({"top1": 0.9, "history": {}}, _settings(), 256)["train_top1_last_epoch"] is None


def test_is_finished_requires_a_complete_matching_record():
    settings = _settings()
    cell = study.Cell("naive", 256, 30, 0, "grid")
    record = {"schema": study.SCHEMA_VERSION, "complete": True, "status": "ok", "train_args":
              cell.train_args(settings), **{k: 0 for k in study.REQUIRED_KEYS}}
    assert study.is_finished(record, cell, settings)
    assert not study.is_finished({**record, "complete": False}, cell, settings)
    assert not study.is_finished({**record, "status": "timeout"}, cell, settings)
    assert not study.is_finished({k: v for k, v in record.items() if k != "top1"}, cell, settings)
    assert not study.is_finished({**record, "train_args": record["train_args"] + ["--cache"]}, cell, settings)
    assert study.is_finished({**record, "loaded": True}, cell, settings)
    assert not study.is_finished({**record, "loaded": True}, cell, _settings(rerun_loaded=True))
    assert study.load_record("/nonexistent/x.json") is None


def test_estimate_interpolates_in_log2_batch():
    settings = _settings()
    assert study.estimate_cell_seconds(study.Cell("naive", 256, 30, 0, "grid"), settings) == 60 + 30 * 52 + 30 * 5
    assert study.estimate_cell_seconds(study.Cell("naive", 1024, 30, 0, "grid"), settings) == 60 + 30 * 62 + 150
    # Measured figures replace the defaults at their batches.
    assert study.estimate_cell_seconds(study.Cell("naive", 256, 10, 0, "grid"), settings, {256: 40.0}) == \
        60 + 400 + 50


# ---------------------------------------------------------------------------------------------------------------
# The real train.py.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_tiny_cells_of_the_real_train_py(tmp_path):
    """2 cells (batches 32 and 64, 2 steps per epoch, 1 epoch) of scripts/train.py on 320 tiny records: the records,
    the table; a rerun trains nothing."""
    from tfscale import data as tdata

    records = str(tmp_path / "records")
    images, labels = tdata.fashion_mnist.load_arrays(split="train")
    tdata.convert_arrays(images[:320], labels[:320], records, "train", 4, progress=False)
    tdata.convert_arrays(images[320:400], labels[320:400], records, "validation", 2, progress=False)
    args = [f"--study_dir={tmp_path / 'study'}", f"--doc_path={tmp_path / 'doc.md'}", "--batches=32,64",
            "--recipes=naive", "--baseline_batch=32", "--epochs=1", "--seeds=1", "--tuning_budget=1",
            "--nobaseline_check", "--load_sample_seconds=1", "--train_flag=--dataset=imagenet",
            f"--train_flag=--data_dir={records}", "--train_flag=--steps_per_epoch=2", "--train_flag=--num_classes=10",
            "--train_flag=--image_size=28", "--train_flag=--model=resnet8"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = _study(args, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cells: 2 run, 0 skipped (finished), 0 failed" in proc.stdout
    for cell, batch in (("b32-naive-e1-s0", 32), ("b64-naive-e1-s0", 64)):
        record = json.loads((tmp_path / "data" / "doc" / f"{cell}.json").read_text())
        assert record["status"] == "ok" and record["global_batch_size"] == batch
        assert 0.0 <= record["top1"] <= record["top5"] <= 1.0
        assert record["steps"] == 2 and record["epochs_run"] == 1
        assert len(record["val_top1_by_epoch"]) == 1  # validated after its one epoch
        assert record["peak_learning_rate"] == pytest.approx(0.1 * batch / 256)  # imagenet: base_lr 0.1
        assert record["cell_runnable_mean"] is None or record["cell_runnable_mean"] >= 0
    doc = (tmp_path / "doc.md").read_text()
    assert re.search(r"\| naive \| \d+\.\d\d \| \d+\.\d\d \|", doc)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "doc").iterdir()}
    rerun = _study(args, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cells: 0 run, 2 skipped (finished), 0 failed" in rerun.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "doc").iterdir()} == mtimes
