"""The state of a run directory: is it usable, is the run finished, and does a resume match the stored config.

`scripts/train.py` stores its resolved configuration in ``<model_dir>/run_config.json`` when a run starts. A later
start with the same ``--model_dir`` then:

* fails when the run is **finished** (``results.json`` exists), unless ``--overwrite`` is given, which removes the
  previous run's files (`RUN_FILES`, the backup and the TensorBoard logs) and trains from scratch;
* fails when a **training-relevant flag differs** from the stored one, listing every difference, unless
  ``--allow_config_change`` is given (the differences are then printed and the stored config updated);
* otherwise resumes from the backup (Keras `BackupAndRestore`).

Flags that do not change what is trained (where the data or the output live, evaluation frequency, fail-fast and
damaged-file policies, the fusion buffer size) are in `NOT_TRAINING_RELEVANT` and may change freely.

This module is pure Python (no TensorFlow).
"""

import json
import os
import shutil

__all__ = [
    "RUN_CONFIG_FILE",
    "RESULTS_FILE",
    "RUN_FILES",
    "NOT_TRAINING_RELEVANT",
    "RunStateError",
    "check_model_dir",
    "config_differences",
    "check_resume",
    "write_run_config",
]

RUN_CONFIG_FILE = "run_config.json"
RESULTS_FILE = "results.json"
#: Files and directories of a run that ``--overwrite`` removes (nothing else in model_dir is touched).
RUN_FILES = (RESULTS_FILE, "model.keras", RUN_CONFIG_FILE, "backup", "logs")
#: Config keys whose change does not change the training (they may differ on resume).
NOT_TRAINING_RELEVANT = frozenset({
    "model_dir", "data_dir", "fashion_mnist_source", "tf_data_service", "eval_every_epochs", "fail_fast_records",
    "on_damaged_file", "bytes_per_pack", "allow_config_change", "overwrite", "recipe_reference", "startup_timeout",
    "profile_steps", "jit_compile",
})


class RunStateError(ValueError):
    """The run directory cannot be used as asked (a file, not writable, a finished run, a changed config)."""


def check_model_dir(model_dir):
    """Creates `model_dir` if needed and checks that files can be written in it.

    Args:
      model_dir: str, the run directory (``--model_dir``).

    Raises:
      RunStateError: if it is an existing file, cannot be created, or is not writable; the message names the
        flag, the value and the OS error.
    """
    if not isinstance(model_dir, str) or not model_dir:
        raise RunStateError(f"Flag --model_dir must be a directory path. Received: --model_dir={model_dir!r}")
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise RunStateError(f"Flag --model_dir={model_dir!r} is a file, not a directory. Expected a directory "
                            "for checkpoints, logs and results.json (it is created when missing).")
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, f".tfscale-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise RunStateError(f"Flag --model_dir={model_dir!r} is not a writable directory ({err.strerror or err}). "
                            "Expected a directory this process can create files in.") from None


def _comparable(config):
    return {k: v for k, v in config.items() if k not in NOT_TRAINING_RELEVANT}


def config_differences(stored, current):
    """Returns the training-relevant differences between two configs.

    Args:
      stored: dict, the config stored by the earlier start.
      current: dict, this start's config (JSON-compatible values).

    Returns:
      A sorted list of `(key, stored value, current value)`; a key missing on one side shows as None there.
    """
    a, b = _comparable(stored), _comparable(json.loads(json.dumps(current)))
    return sorted((k, a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_resume(model_dir, config, allow_config_change=False, overwrite=False, print_fn=print):
    """Decides whether this start may use `model_dir`; call it before training, on every worker.

    Args:
      model_dir: str, the run directory.
      config: dict, this start's resolved config (JSON-compatible).
      allow_config_change: bool, resume even when training-relevant flags differ (prints them).
      overwrite: bool, remove a previous run's files (`RUN_FILES`) and start from scratch; needed to re-run a
        finished run.
      print_fn: callable taking a str, for notices.

    Returns:
      ``"new"`` (no previous run), ``"resume"`` (a previous, unfinished run with a matching or allowed config) or
      ``"overwritten"``.

    Raises:
      RunStateError: for a finished run without `overwrite`, or a changed config without `allow_config_change`.
    """
    config_path = os.path.join(model_dir, RUN_CONFIG_FILE)
    results_path = os.path.join(model_dir, RESULTS_FILE)
    has_backup = os.path.isdir(os.path.join(model_dir, "backup"))
    previous = os.path.exists(config_path) or os.path.exists(results_path) or has_backup
    if not previous:
        return "new"
    if overwrite:
        for name in RUN_FILES:
            path = os.path.join(model_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        print_fn(f"--overwrite: removed the previous run's files in {model_dir} ({', '.join(RUN_FILES)}).")
        return "overwritten"
    if os.path.exists(results_path):
        raise RunStateError(
            f"The run in --model_dir={model_dir!r} is finished: {results_path} exists. Pass --overwrite to train "
            "it again from scratch (its results, model, backup and logs are removed), or choose a new --model_dir.")
    if os.path.exists(config_path):
        with open(config_path) as f:
            stored = json.load(f)
        differences = config_differences(stored, config)
        if differences:
            lines = "\n".join(f"  --{k}: {a!r} (stored) -> {b!r} (now)" for k, a, b in differences)
            if not allow_config_change:
                raise RunStateError(
                    f"--model_dir={model_dir!r} holds an unfinished run with a different configuration, so it "
                    f"cannot be resumed as is:\n{lines}\nPass --allow_config_change to resume with the new values "
                    "anyway, or choose a new --model_dir (or --overwrite to discard the old run).")
            print_fn(f"--allow_config_change: resuming {model_dir} with changed flags:\n{lines}")
    else:
        print_fn(f"WARNING: {model_dir} has a backup but no {RUN_CONFIG_FILE} (written by an older tfscale); "
                 "resuming without checking the configuration.")
    return "resume"


def write_run_config(model_dir, config):
    """Writes `config` to ``<model_dir>/run_config.json`` atomically (temporary file, then rename).

    Returns:
      The path written.
    """
    path = os.path.join(model_dir, RUN_CONFIG_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path
