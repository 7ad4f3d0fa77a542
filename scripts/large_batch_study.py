r"""The large-batch study (issue 14): how large can the global batch grow before top-1 drops, per recipe?

It runs a grid of (global batch x recipe [x peak-LR tuning value] [x seed]) at one fixed epoch budget E through the
same code path as the main job: every cell is a subprocess

  python scripts/train.py --model_dir=<study_dir>/cells/<cell_id> --global_batch_size=B --epochs=E --seed=S \
      --eval_every_epochs=1 <the recipe's flags> [--base_lr=...] [--train_flag values]

with a timeout, so a crash or a hang of one cell cannot take the study down. The cell's `results.json` is read
back and one JSON per cell is written to `<results_dir>/<cell_id>.json` (top-1, top-5, wall time, steps,
images/s, the time and steps to reach 90% and 91% validation top-1, the load averages and a `loaded` flag); all of
them together go to `<study_dir>/study.json`. The results directory sits beside the doc (default
`docs/data/large_batch/`), so the cell JSONs are committed with the page made from them: the study can be run a
few cells at a time on different machines, and a fresh clone skips the cells that have finished. At the end the
study writes `docs/large_batch.md` with the table, the plots (`docs/large_batch_top1_vs_batch.png`,
`docs/large_batch_val_top1_b<largest>.png`) and the exact command.

The grid (defaults):

* recipes (`RECIPES`): `naive` (linear scaling, no warm-up: the default job's momentum SGD with
  `--warmup_epochs=0`), `goyal`, `mlperf` (LARS), `mikami` (batch-size control), `akiba` (RMSprop warm-up): the
  `--recipe` values of `scripts/train.py`, whose hyperparameters are `tfscale.optimizers.recipe_hyperparameters`;
* global batches 256, 1024, 2048, 4096 and 8192 (for `mikami`, the batch of the first phase; it doubles after a
  third of the epochs);
* one epoch budget E (`--epochs`, default 30) for every cell, and a convergence check of the baseline (`naive` at
  batch 256) at 2E;
* a tuning budget of at most `--tuning_budget` peak learning rates per recipe at the largest batch (the recipe's
  own rate times each `--tuning_factors` value, plus its own);
* `--seeds` seeds (default 3) for the baseline and for the best recipe at batch 4096 (chosen when its grid cells
  have finished), reported as mean +- sample standard deviation;
* ablations (`--ablation`, default `DEFAULT_ABLATIONS`): one change at a time to `--ablation_recipe` (mlperf) at
  `--ablation_batch` (4096), reported in their own table against the recipe's own cell and kept out of the
  recipe table and the goals (they are extra tuning of one recipe).

Cells run one at a time. The study is resumable: a cell whose JSON exists and is complete (status `ok` or
`diverged`, same train.py arguments) is skipped; any other cell is re-run from scratch after its model directory
is deleted (so train.py cannot resume a different configuration from an old backup).

Examples:

  python scripts/large_batch_study.py --dry_run            # the grid, the commands, the estimated wall time
  python scripts/large_batch_study.py                      # the whole study (resumable)
  python scripts/large_batch_study.py --quick              # the <= 1 hour subset (docs/large_batch_quick.md)
  python scripts/large_batch_study.py --report_only        # rewrite the doc from the finished cells
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from tfscale import _atomic

FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRAIN_SCRIPT = os.path.join(REPO, "scripts", "train.py")

#: Study recipe name -> the train.py flags that select it (every other flag keeps train.py's default).
RECIPES = {
    "naive": ("--optimizer=sgd", "--lr_schedule=warmup_poly", "--warmup_epochs=0"),
    "goyal": ("--recipe=goyal",),
    "mlperf": ("--recipe=mlperf",),
    "mikami": ("--recipe=mikami",),
    "akiba": ("--recipe=akiba",),
}
RECIPE_DESCRIPTIONS = {
    "naive": "linear scaling with no warm-up: the default job's momentum SGD (base LR per 256 images x B/256, "
             "polynomial decay, label smoothing 0.1) with `--warmup_epochs=0`",
    "goyal": "Goyal et al., arXiv:1706.02677: momentum SGD, 0.1 x B/256, gradual warm-up, x0.1 steps",
    "mlperf": "MLPerf LARS (You et al., arXiv:1708.03888): warm-up + polynomial decay (power 2), label smoothing",
    "mikami": "Mikami et al., arXiv:1811.05233: batch-size control (B, then 2B after a third of the epochs), "
              "label smoothing, momentum SGD with warm-up",
    "akiba": "Akiba et al., arXiv:1711.04325: RMSprop warm-up blended into momentum SGD, slow-start schedule",
}

#: Values of --quick for the flags not given explicitly: 4 cells, about 50 minutes on the 2-core machine.
QUICK = {
    "batches": ["256", "4096"],
    "recipes": ["naive", "mlperf"],
    "epochs": 10,
    "seeds": 1,
    "tuning_budget": 1,
    "baseline_check": False,
    "ablation": [],
}

#: train.py flags the study sets per cell; --train_flag may not set them.
STUDY_CONTROLLED_FLAGS = ("model_dir", "global_batch_size", "batch_schedule", "epochs", "seed", "eval_every_epochs",
                          "recipe", "base_lr")

#: The ablation variants run by default (--ablation): one change each to --ablation_recipe at --ablation_batch,
#: chosen from the 4096 cells of 2026-12-03 (MLPerf LARS 90.25%: training top-1 91.7% at the end, so it underfits
#: in its 439 steps rather than overfits; its validation collapsed to 17-23% in epochs 2-4 right after a 1.7-epoch
#: warm-up).
DEFAULT_ABLATIONS = (
    "lr2x: --base_lr=1.25",  # twice the recipe's peak LR at 4096 (10 -> 20): more progress per step
    "cosine: --lr_schedule=warmup_cosine",  # keeps the LR higher for longer than polynomial decay of power 2
    "warmup5: --warmup_epochs=5",  # the MLPerf table's 5 warm-up epochs at 4096, not scaled by E/90
    # The two that helped most, together (2026-12-03: lr2x +0.58, cosine +0.68, warmup5 +0.37 points; one seed).
    "lr2x_cosine: --base_lr=1.25 --lr_schedule=warmup_cosine",
    # Second round, on top of lr2x_cosine (91.97%, still underfitting: 91.7% training top-1 for plain mlperf against
    # 97.0% for the baseline): a longer warm-up for the higher peak, a higher peak still, and no label smoothing.
    "lr2x_cosine_warmup5: --base_lr=1.25 --lr_schedule=warmup_cosine --warmup_epochs=5",
    "lr4x_cosine: --base_lr=2.5 --lr_schedule=warmup_cosine",
    "lr2x_cosine_ls0: --base_lr=1.25 --lr_schedule=warmup_cosine --label_smoothing=0",
    # Twice the trust coefficient: the weights' step doubles again while BN parameters and biases (trust 1, MLPerf's
    # skip list) stay at peak LR 20 (lr4x_cosine, which doubles both, stopped learning by epoch 3 in a partial run).
    "lr2x_cosine_eta2x: --base_lr=1.25 --lr_schedule=warmup_cosine --lars_eta=0.002",
)
#: train.py flags an ablation may not set (the study sets them per cell; the variant is of --ablation_recipe).
ABLATION_CONTROLLED_FLAGS = ("model_dir", "global_batch_size", "batch_schedule", "epochs", "seed",
                             "eval_every_epochs", "recipe")

#: Cell statuses that are results (kept on rerun); "failed" and "timeout" cells are run again.
FINISHED_STATUSES = ("ok", "diverged")
#: Keys a finished "ok" cell JSON must have.
REQUIRED_KEYS = ("top1", "top5", "wall_seconds", "steps", "images_per_second", "time_to_target", "loadavg_start",
                 "loadavg_end", "loaded", "val_top1_by_epoch")
SCHEMA_VERSION = 1
_STUDY_FLAGS: list = []  # the names define_flags() defines, for the exact command in the doc
_KILL_GRACE_SECONDS = 20
_SIX_HOURS = 6 * 3600.0


def define_flags():
    """Defines the study's command-line flags (call once, before parsing)."""
    before = set(FLAGS)
    flags.DEFINE_list("batches", ["256", "1024", "2048", "4096", "8192"],
                      "Global batch sizes of the grid (images per step over all replicas), comma-separated.")
    flags.DEFINE_list("recipes", list(RECIPES), f"Recipes of the grid, comma-separated, from {list(RECIPES)}.")
    flags.DEFINE_integer("epochs", 30, "The epoch budget E of every cell (the baseline check runs 2E).")
    flags.DEFINE_bool("baseline_check", True, "Also run the baseline (--baseline_recipe at --baseline_batch) for "
                      "2E epochs, to show that E has converged (top-1 at E and 2E within 0.3 points).")
    flags.DEFINE_integer("baseline_batch", 256, "Global batch of the baseline; must be one of --batches.")
    flags.DEFINE_string("baseline_recipe", "naive", "Recipe of the baseline; must be one of --recipes.")
    flags.DEFINE_integer("seeds", 3, "Seeds (0..N-1) for the baseline and for the best recipe at --seed_batch "
                         "(1: no repeats).")
    flags.DEFINE_integer("seed_batch", 4096, "Global batch whose best recipe is repeated with --seeds seeds (skipped "
                         "when it is not one of --batches).")
    flags.DEFINE_integer("tuning_budget", 4, "Most peak learning rates per recipe at the largest batch, the "
                         "recipe's own included (1: no tuning).")
    flags.DEFINE_list("tuning_factors", ["0.25", "0.5", "2"], "Multipliers of a recipe's own peak learning rate "
                      "tried at the largest batch (at most --tuning_budget - 1 of them are used, in this order).")
    flags.DEFINE_integer("eval_every_epochs", 1, "Validation frequency of every cell, in epochs (the resolution of "
                         "the time-to-90%/91% figures).")
    flags.DEFINE_list("targets", ["0.90", "0.91"], "Validation top-1 targets for the time-to-target figures.")
    flags.DEFINE_multi_string("train_flag", [], "An extra flag for every cell's train.py, e.g. "
                              "--train_flag=--data_dir=/data/fm (repeatable). It may not set "
                              f"{', '.join('--' + f for f in STUDY_CONTROLLED_FLAGS)}.")
    flags.DEFINE_multi_string("ablation", list(DEFAULT_ABLATIONS), "An ablation variant 'NAME: TRAIN_FLAGS': "
                              "--ablation_recipe at --ablation_batch with these train.py flags added (one change at a "
                              "time; repeatable; --ablation= for none; absolute values, so --base_lr is per 256 "
                              "images at --ablation_batch's recipe). The defaults run only when the grid has "
                              "--ablation_recipe at --ablation_batch (not with --quick). NAME is letters, digits, "
                              "'.' and '_'; the flags may not set "
                              f"{', '.join('--' + f for f in ABLATION_CONTROLLED_FLAGS)}.")
    flags.DEFINE_string("ablation_recipe", "mlperf", "The recipe the ablation variants change; must be one of "
                        "--recipes.")
    flags.DEFINE_integer("ablation_batch", 4096, "Global batch of the ablation cells; must be one of --batches.")
    flags.DEFINE_string("study_dir", None, "Where the cells' model directories (cells/), their logs (logs/) and "
                        "study.json go (default: runs/large_batch_study, or runs/large_batch_study_quick with "
                        "--quick).")
    flags.DEFINE_string("results_dir", None, "Where the one JSON per cell goes, read back to skip finished cells and "
                        "to write the doc (default: beside the doc, <doc dir>/data/<doc name without .md>, e.g. "
                        "docs/data/large_batch; commit it with the doc).")
    flags.DEFINE_string("doc_path", None, "The Markdown report; its PNGs go beside it (default: docs/large_batch.md, "
                        "or docs/large_batch_quick.md with --quick).")
    flags.DEFINE_string("train_script", DEFAULT_TRAIN_SCRIPT, "The training script each cell runs.")
    flags.DEFINE_string("cells", None, "Only run cells whose id matches this regular expression (the doc still "
                        "reports every finished cell).")
    flags.DEFINE_bool("quick", False, "The quick subset: batches 256 and 4096, recipes naive and mlperf, E = 10, one "
                      "seed, no tuning, no baseline check (flags given explicitly still win); about 50 minutes.")
    flags.DEFINE_bool("dry_run", False, "Print the grid (cell ids and train.py commands) and the estimated wall time; "
                      "run nothing and write nothing.")
    flags.DEFINE_bool("report_only", False, "Run no cell; rewrite the doc from the finished cells.")
    flags.DEFINE_bool("rerun_loaded", False, "Treat finished cells flagged `loaded` as unfinished (run them again).")
    flags.DEFINE_float("cell_timeout_seconds", 0.0, "Per-cell timeout in seconds (0: 3x the cell's estimate, at "
                       "least 30 minutes). A cell that runs longer is killed and recorded as `timeout`.")
    flags.DEFINE_float("load_threshold", 0.5, "A cell is flagged `loaded` when the 1-minute load average of the "
                       "other processes (runnable threads outside the cell, averaged like the kernel's) exceeds "
                       "this during the cell.")
    flags.DEFINE_float("load_sample_seconds", 5.0, "Seconds between load samples while a cell runs.")
    flags.DEFINE_list("estimate_epoch_seconds", ["256:38", "4096:42"],
                      "BATCH:SECONDS of one training epoch (evaluation excluded) for the wall-time estimate, "
                      "interpolated linearly in log2(batch); measured on the quiet 2-core machine with the default "
                      "data (the --quick cells of docs/large_batch_quick.md, 2026-12-02). "
                      "Finished cells' measured figures replace them.")
    flags.DEFINE_float("estimate_eval_seconds", 2.2, "Seconds of one validation pass, for the estimate (measured: "
                       "5.4% of the training loop in the --quick cells).")
    flags.DEFINE_float("estimate_cell_overhead_seconds", 60.0, "Seconds per cell outside the epochs (start-up, "
                       "tracing, the final exact evaluation, saving), for the estimate.")
    _STUDY_FLAGS[:] = sorted(set(FLAGS) - before)


# ---------------------------------------------------------------------------------------------------------------
# Settings and the grid.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """The study's resolved settings (flags, with --quick's values where a flag was not given explicitly)."""

    batches: tuple
    recipes: tuple
    epochs: int
    baseline_check: bool
    baseline_batch: int
    baseline_recipe: str
    seeds: int
    seed_batch: int
    tuning_budget: int
    tuning_factors: tuple
    eval_every_epochs: int
    targets: tuple
    train_flags: tuple
    study_dir: str
    doc_path: str
    train_script: str
    cells_regex: str | None
    quick: bool
    cell_timeout_seconds: float
    load_threshold: float
    load_sample_seconds: float
    estimate_epoch_seconds: tuple
    estimate_eval_seconds: float
    estimate_cell_overhead_seconds: float
    rerun_loaded: bool
    results_dir: str
    ablations: tuple = ()  # ((name, (train.py flags...)), ...)
    ablation_recipe: str = "mlperf"
    ablation_batch: int = 4096

    @property
    def largest_batch(self) -> int:
        return max(self.batches)

    @property
    def used_tuning_factors(self) -> tuple:
        """The factors actually tried: distinct, not 1, at most tuning_budget - 1 of them."""
        factors = []
        for f in self.tuning_factors:
            if f != 1.0 and f not in factors:
                factors.append(f)
        return tuple(factors[: max(0, self.tuning_budget - 1)])


def _value(flags_obj, name, quick):
    if quick and name in QUICK and not flags_obj[name].present:
        return QUICK[name]
    return flags_obj[name].value


def _ints(name, values):
    out = []
    for v in values:
        try:
            out.append(int(str(v).strip()))
        except ValueError:
            raise ValueError(f"Flag --{name} must be a comma-separated list of integers. Received: "
                             f"--{name}={','.join(map(str, values))}") from None
    return out


def _floats(name, values):
    out = []
    for v in values:
        try:
            out.append(float(str(v).strip()))
        except ValueError:
            raise ValueError(f"Flag --{name} must be a comma-separated list of numbers. Received: "
                             f"--{name}={','.join(map(str, values))}") from None
    return out


def settings_from_flags(flags_obj) -> Settings:
    """Returns the resolved settings.

    Raises:
        ValueError: for a bad flag value, naming the flag, the value and what was expected.
    """
    quick = flags_obj["quick"].value
    batches = _ints("batches", _value(flags_obj, "batches", quick))
    if not batches or any(b < 1 for b in batches) or len(set(batches)) != len(batches):
        raise ValueError(f"Flag --batches must list distinct integers >= 1. Received: --batches={batches}")
    recipes = [r.strip() for r in _value(flags_obj, "recipes", quick)]
    unknown = [r for r in recipes if r not in RECIPES]
    if not recipes or unknown or len(set(recipes)) != len(recipes):
        raise ValueError(f"Flag --recipes must list distinct names from {sorted(RECIPES)}. Received: "
                         f"--recipes={','.join(recipes)}")
    epochs = _value(flags_obj, "epochs", quick)
    if epochs < 1:
        raise ValueError(f"Flag --epochs must be >= 1. Received: --epochs={epochs}")
    baseline_batch = flags_obj["baseline_batch"].value
    if baseline_batch not in batches:
        raise ValueError(f"Flag --baseline_batch must be one of --batches={batches}. Received: "
                         f"--baseline_batch={baseline_batch}")
    baseline_recipe = flags_obj["baseline_recipe"].value
    if baseline_recipe not in recipes:
        raise ValueError(f"Flag --baseline_recipe must be one of --recipes={recipes}. Received: "
                         f"--baseline_recipe={baseline_recipe!r}")
    seeds = _value(flags_obj, "seeds", quick)
    if seeds < 1:
        raise ValueError(f"Flag --seeds must be >= 1. Received: --seeds={seeds}")
    tuning_budget = _value(flags_obj, "tuning_budget", quick)
    if tuning_budget < 1:
        raise ValueError(f"Flag --tuning_budget must be >= 1 (1: no tuning). Received: --tuning_budget={tuning_budget}")
    factors = _floats("tuning_factors", flags_obj["tuning_factors"].value)
    if any(not (f > 0 and math.isfinite(f)) for f in factors):
        raise ValueError(f"Flag --tuning_factors must be finite numbers > 0. Received: --tuning_factors="
                         f"{','.join(map(str, factors))}")
    eval_every = flags_obj["eval_every_epochs"].value
    if eval_every < 1:
        raise ValueError(f"Flag --eval_every_epochs must be >= 1. Received: --eval_every_epochs={eval_every}")
    targets = _floats("targets", flags_obj["targets"].value)
    if not targets or any(not 0 < t <= 1 for t in targets):
        raise ValueError(f"Flag --targets must be top-1 fractions in (0, 1]. Received: --targets={targets}")
    train_flags = tuple(flags_obj["train_flag"].value or ())
    for item in train_flags:
        name = _train_flag_name(item)
        if name is None:
            raise ValueError(f"Flag --train_flag must be a train.py flag like --name=value. Received: "
                             f"--train_flag={item!r}")
        if name in STUDY_CONTROLLED_FLAGS:
            raise ValueError(f"Flag --train_flag may not set --{name} (the study sets it per cell). "
                             f"Received: --train_flag={item!r}")
    ablations = parse_ablations(_value(flags_obj, "ablation", quick) or ())
    ablation_recipe = flags_obj["ablation_recipe"].value
    ablation_batch = flags_obj["ablation_batch"].value
    explicit = any(flags_obj[n].present for n in ("ablation", "ablation_recipe", "ablation_batch"))
    if ablations and ablation_recipe not in recipes:
        if explicit:
            raise ValueError(f"Flag --ablation_recipe must be one of --recipes={recipes}. Received: "
                             f"--ablation_recipe={ablation_recipe!r}")
        ablations = ()  # the default variants belong to the default grid (mlperf at 4096): none in this grid
    if ablations and ablation_batch not in batches:
        if explicit:
            raise ValueError(f"Flag --ablation_batch must be one of --batches={batches}. Received: "
                             f"--ablation_batch={ablation_batch}")
        ablations = ()
    estimate = []
    for item in flags_obj["estimate_epoch_seconds"].value:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*([0-9.]+)\s*", item)
        if not match or float(match.group(2)) <= 0:
            raise ValueError(f"Flag --estimate_epoch_seconds must be BATCH:SECONDS,... with seconds > 0. "
                             "Received: --estimate_epoch_seconds="
                             f"{','.join(flags_obj['estimate_epoch_seconds'].value)}")
        estimate.append((int(match.group(1)), float(match.group(2))))
    if not estimate:
        raise ValueError("Flag --estimate_epoch_seconds must give at least one BATCH:SECONDS. Received: "
                         "--estimate_epoch_seconds=")
    for name in ("cell_timeout_seconds", "estimate_eval_seconds", "estimate_cell_overhead_seconds"):
        value = flags_obj[name].value
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"Flag --{name} must be a finite number >= 0. Received: --{name}={value}")
    for name in ("load_threshold", "load_sample_seconds"):
        value = flags_obj[name].value
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"Flag --{name} must be a finite number > 0. Received: --{name}={value}")
    cells_regex = flags_obj["cells"].value
    if cells_regex is not None:
        try:
            re.compile(cells_regex)
        except re.error as err:
            raise ValueError(f"Flag --cells must be a regular expression ({err}). Received: "
                             f"--cells={cells_regex!r}") from None
    train_script = flags_obj["train_script"].value
    if not os.path.isfile(train_script):
        raise ValueError(f"Flag --train_script must be an existing file. Received: --train_script={train_script!r}")
    suffix = "_quick" if quick else ""
    study_dir = flags_obj["study_dir"].value or os.path.join("runs", "large_batch_study" + suffix)
    doc_path = flags_obj["doc_path"].value or os.path.join("docs", f"large_batch{suffix}.md")
    if not doc_path.endswith(".md"):
        raise ValueError(f"Flag --doc_path must name a .md file. Received: --doc_path={doc_path!r}")
    results_dir = flags_obj["results_dir"].value or os.path.join(
        os.path.dirname(doc_path), "data", os.path.basename(doc_path)[:-len(".md")])
    return Settings(
        batches=tuple(sorted(batches)), recipes=tuple(recipes), epochs=epochs,
        baseline_check=_value(flags_obj, "baseline_check", quick), baseline_batch=baseline_batch,
        baseline_recipe=baseline_recipe, seeds=seeds, seed_batch=flags_obj["seed_batch"].value,
        tuning_budget=tuning_budget, tuning_factors=tuple(factors), eval_every_epochs=eval_every,
        targets=tuple(sorted(targets)), train_flags=train_flags, study_dir=study_dir, doc_path=doc_path,
        train_script=train_script, cells_regex=cells_regex, quick=quick,
        cell_timeout_seconds=flags_obj["cell_timeout_seconds"].value,
        load_threshold=flags_obj["load_threshold"].value, load_sample_seconds=flags_obj["load_sample_seconds"].value,
        estimate_epoch_seconds=tuple(sorted(estimate)),
        estimate_eval_seconds=flags_obj["estimate_eval_seconds"].value,
        estimate_cell_overhead_seconds=flags_obj["estimate_cell_overhead_seconds"].value,
        rerun_loaded=flags_obj["rerun_loaded"].value, results_dir=results_dir, ablations=ablations,
        ablation_recipe=ablation_recipe, ablation_batch=ablation_batch,
    )


def _train_flag_name(item):
    """The flag name of a train.py option '--name', '--noname' or '--name=value' (None when it is not one)."""
    match = re.fullmatch(r"--(?:no)?([A-Za-z_][A-Za-z0-9_]*)(=.*)?", item, re.S)
    return match.group(1) if match else None


def parse_ablations(values) -> tuple:
    """Parses --ablation values 'NAME: TRAIN_FLAGS' into ((name, (flag, ...)), ...).

    An empty value (``--ablation=``) is skipped, so ``--ablation=`` alone runs no ablation.

    Raises:
        ValueError: for a value without a name or flags, a bad or repeated name, a flag that is not
            ``--name[=value]``, or one of `ABLATION_CONTROLLED_FLAGS`.
    """
    out, names = [], set()
    for value in values:
        if not str(value).strip():
            continue
        name, sep, rest = str(value).partition(":")
        name = name.strip()
        try:
            train_flags = tuple(shlex.split(rest))
        except ValueError as err:
            raise ValueError(f"Flag --ablation has unbalanced quotes ({err}). Received: --ablation={value!r}") from None
        if not sep or not re.fullmatch(r"[A-Za-z0-9._]+", name) or not train_flags:
            raise ValueError("Flag --ablation must be 'NAME: TRAIN_FLAGS' (NAME of letters, digits, '.' and '_'; at "
                             f"least one train.py flag), e.g. --ablation='warmup5: --warmup_epochs=5'. Received: "
                             f"--ablation={value!r}")
        if name in names:
            raise ValueError(f"Flag --ablation names must be distinct; {name!r} is repeated. Received: "
                             f"--ablation={value!r}")
        for item in train_flags:
            flag_name = _train_flag_name(item)
            if flag_name is None:
                raise ValueError(f"Flag --ablation's train.py flags must be like --name=value. Received: "
                                 f"--ablation={value!r} ({item!r})")
            if flag_name in ABLATION_CONTROLLED_FLAGS:
                raise ValueError(f"Flag --ablation may not set --{flag_name} (the study sets it per cell). "
                                 f"Received: --ablation={value!r}")
        names.add(name)
        out.append((name, train_flags))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One train.py run of the study.

    Attributes:
        recipe: a `RECIPES` name, or "" for a placeholder whose recipe is chosen later (the best at --seed_batch).
        batch: global batch (images per step; for mikami, the first phase's).
        epochs: epochs of the run (E, or 2E for the baseline check).
        seed: train.py's --seed.
        role: "grid", "baseline_check", "baseline_seed", "ablation", "tuning" or "best_seed".
        lr_factor: multiplier of the recipe's own peak learning rate (1.0 except for tuning cells).
        base_lr: the explicit --base_lr of a tuning cell (learning rate per 256 images), else None.
        variant: an ablation's name ("" for every other cell).
        variant_flags: the ablation's train.py flags, added after the recipe's.
    """

    recipe: str
    batch: int
    epochs: int
    seed: int
    role: str
    lr_factor: float = 1.0
    base_lr: float | None = None
    variant: str = ""
    variant_flags: tuple = ()

    @property
    def cell_id(self) -> str:
        lr = "" if self.lr_factor == 1.0 else f"-lr{self.lr_factor:g}x"
        variant = f"+{self.variant}" if self.variant else ""
        return f"b{self.batch}-{self.recipe or 'BEST'}{variant}{lr}-e{self.epochs}-s{self.seed}"

    @property
    def placeholder(self) -> bool:
        return not self.recipe

    def train_args(self, settings: Settings) -> list:
        """train.py's arguments (without the interpreter and the script)."""
        args = [f"--model_dir={os.path.join(settings.study_dir, 'cells', self.cell_id)}",
                f"--global_batch_size={self.batch}", f"--epochs={self.epochs}", f"--seed={self.seed}",
                f"--eval_every_epochs={settings.eval_every_epochs}"]
        args += list(RECIPES.get(self.recipe, ("--recipe=<best at this batch>",)))
        args += list(self.variant_flags)
        if self.base_lr is not None:
            args.append(f"--base_lr={self.base_lr:.6g}")
        return args + list(settings.train_flags)


def grid_cells(settings: Settings) -> list:
    """The cells known before anything runs: the grid, the baseline check and the baseline's seeds.

    Returns:
        list of `Cell`, in run order (grid by batch, then the baseline check, then the baseline's extra seeds).
    """
    cells = [Cell(r, b, settings.epochs, 0, "grid") for b in settings.batches for r in settings.recipes]
    if settings.baseline_check:
        cells.append(Cell(settings.baseline_recipe, settings.baseline_batch, 2 * settings.epochs, 0,
                          "baseline_check"))
    cells += [Cell(settings.baseline_recipe, settings.baseline_batch, settings.epochs, s, "baseline_seed")
              for s in range(1, settings.seeds)]
    return cells


def ablation_cells(settings: Settings) -> list:
    """One cell per --ablation variant: --ablation_recipe at --ablation_batch, E epochs, seed 0, role "ablation"."""
    return [Cell(settings.ablation_recipe, settings.ablation_batch, settings.epochs, 0, "ablation",
                 variant=name, variant_flags=flags_) for name, flags_ in settings.ablations]


def tuning_cells(settings: Settings, base_lrs: dict) -> list:
    """The tuning cells at the largest batch: each recipe's own base LR times each used factor.

    Args:
        base_lrs: recipe -> its resolved learning rate per 256 images at the largest batch (train.py's
            `resolve_config`).
    """
    return [Cell(r, settings.largest_batch, settings.epochs, 0, "tuning", f, base_lrs[r] * f)
            for r in settings.recipes for f in settings.used_tuning_factors]


def best_seed_cells(settings: Settings, best_recipe: str | None) -> list:
    """The extra seeds of the best recipe at --seed_batch ("" recipe: a placeholder, not yet chosen)."""
    if settings.seeds < 2 or settings.seed_batch not in settings.batches:
        return []
    if best_recipe == settings.baseline_recipe and settings.seed_batch == settings.baseline_batch:
        return []  # already the baseline's seeds
    return [Cell(best_recipe or "", settings.seed_batch, settings.epochs, s, "best_seed")
            for s in range(1, settings.seeds)]


# ---------------------------------------------------------------------------------------------------------------
# train.py's own resolution of each cell's flags (a subprocess: the study process never imports TensorFlow).
# ---------------------------------------------------------------------------------------------------------------

_RESOLVE_CODE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_study_train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
train.define_flags()
out = {}
for cell_id, args in json.loads(sys.stdin.read()).items():
    try:
        train.FLAGS.unparse_flags()
        train.FLAGS([sys.argv[1]] + args)
        c = train.resolve_config(train.FLAGS)
        out[cell_id] = {k: c.get(k) for k in ("base_lr", "optimizer", "lr_schedule", "warmup_epochs", "momentum",
                                              "weight_decay", "label_smoothing", "lars_eta", "batch_schedule")}
    except Exception as e:  # noqa: BLE001 - reported per cell
        out[cell_id] = {"error": f"{type(e).__name__}: {e}"}
print("@@RESOLVED@@" + json.dumps(out))
"""


def resolve_configs(settings: Settings, cells) -> dict:
    """Resolves each cell's train.py configuration with train.py's own `resolve_config`, in one subprocess.

    Returns:
        cell_id -> {base_lr, optimizer, lr_schedule, warmup_epochs, ...} or {"error": message}.

    Raises:
        RuntimeError: if the subprocess fails (its stderr is included).
    """
    cells = [c for c in cells if not c.placeholder]
    if not cells:
        return {}
    payload = json.dumps({c.cell_id: c.train_args(settings) for c in cells})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _RESOLVE_CODE, settings.train_script], input=payload,
                          capture_output=True, text=True, env=env, timeout=600)
    marker = "@@RESOLVED@@"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(marker)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"resolving the cells' flags with {settings.train_script}'s resolve_config failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len(marker):])


def peak_learning_rate(resolved: dict, batch: int) -> float | None:
    """The peak learning rate train.py uses: base_lr (per 256 images) x first-phase global batch / 256."""
    base = (resolved or {}).get("base_lr")
    if base is None:
        return None
    schedule = (resolved or {}).get("batch_schedule")
    if schedule:
        batch = int(str(schedule).split(",")[0].split(":")[1])
    return base * batch / 256


# ---------------------------------------------------------------------------------------------------------------
# Cell records.
# ---------------------------------------------------------------------------------------------------------------


def record_path(settings: Settings, cell: Cell) -> str:
    return os.path.join(settings.results_dir, cell.cell_id + ".json")


def load_record(path: str) -> dict | None:
    """The cell JSON at `path`, or None when it is missing, unreadable or not a JSON object."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _comparable_args(args):
    return [a for a in (args or []) if not a.startswith("--model_dir=")]


def is_finished(record: dict | None, cell: Cell, settings: Settings) -> bool:
    """True when `record` is a complete result of `cell` with the current train.py arguments.

    A record is complete when its status is `ok` (with every `REQUIRED_KEYS` entry) or `diverged` (a result: the
    learning rate is too high), and it was made with the same train.py arguments (the model_dir aside). With
    --rerun_loaded, a cell flagged `loaded` is not finished.
    """
    if not record or record.get("schema") != SCHEMA_VERSION or record.get("complete") is not True:
        return False
    if record.get("status") not in FINISHED_STATUSES:
        return False
    if record["status"] == "ok" and any(k not in record for k in REQUIRED_KEYS):
        return False
    if _comparable_args(record.get("train_args")) != _comparable_args(cell.train_args(settings)):
        return False
    return not (settings.rerun_loaded and record.get("loaded"))


def write_json_atomic(path: str, obj) -> None:
    """Writes `obj` as JSON to `path` through a temporary file and a rename (never a partial file)."""
    # mode 0644: mkstemp's 0600 would hide the records from the other users of the machine.
    _atomic.write_json_atomic(path, obj, mode=0o644, indent=1, sort_keys=True, allow_nan=False, default=str)


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validation_curve(history: dict, eval_every_epochs: int, epochs_run=None) -> list:
    """Per-validation points of a train.py history: [(epoch (1-based), val_top1, training seconds so far), ...].

    Training seconds exclude the validation passes: the sum over the epochs so far of `epoch_seconds -
    eval_seconds` (`ThroughputCallback`; the first step's tracing is included, the start-up before fit is not).
    Validated epochs are those with `eval_seconds > 0`; without that key, every `eval_every_epochs`-th epoch.

    Returns:
        list of (int, float, float or None); empty when the history has no validation or the counts disagree.
    """
    val = history.get("val_top1") or []
    n = len(history.get("epoch_seconds") or history.get("loss") or [])
    epochs = list(epochs_run) if epochs_run and len(epochs_run) == n else list(range(n))
    evals = history.get("eval_seconds")
    if evals and len(evals) == n:
        validated = [i for i, s in enumerate(evals) if _finite(s) and s > 0]
    else:
        validated = [i for i, e in enumerate(epochs) if (e + 1) % eval_every_epochs == 0]
    if len(validated) != len(val):
        return []
    seconds = history.get("epoch_seconds") or []
    cumulative, total = [], 0.0
    for i in range(n):
        if i < len(seconds) and _finite(seconds[i]):
            total += seconds[i] - (evals[i] if evals and i < len(evals) and _finite(evals[i]) else 0.0)
            cumulative.append(total)
        else:
            cumulative.append(None)
    return [(epochs[i] + 1, float(v) if _finite(v) else None, cumulative[i]) for i, v in zip(validated, val)]


def time_to_targets(curve, targets, history: dict) -> dict:
    """For each target: the first validated epoch whose val top-1 >= target, its training seconds and steps.

    Returns:
        {"0.9": {"epoch": int, "seconds": float, "steps": int} or None, ...}
    """
    steps_per_epoch = history.get("steps_per_epoch") or []
    out = {}
    for target in targets:
        hit = next(((e, s) for e, v, s in curve if v is not None and v >= target), None)
        if hit is None:
            out[f"{target:g}"] = None
            continue
        epoch, seconds = hit
        steps = sum(steps_per_epoch[:epoch]) if len(steps_per_epoch) >= epoch else None
        out[f"{target:g}"] = {"epoch": epoch, "seconds": seconds, "steps": steps}
    return out


def summarize_results(results: dict, settings: Settings, batch: int) -> dict:
    """The study's figures from a train.py results.json."""
    history = results.get("history") or {}
    curve = validation_curve(history, settings.eval_every_epochs, results.get("epochs_run"))
    steps_per_epoch = history.get("steps_per_epoch") or []
    config = results.get("config") or {}
    evals = [s for s in history.get("eval_seconds") or [] if _finite(s)]
    epoch_seconds = [s for s in history.get("epoch_seconds") or [] if _finite(s)]
    train_top1 = [t for t in history.get("top1") or [] if _finite(t)]
    return {
        "top1": results.get("top1"),
        "top5": results.get("top5"),
        # Keras's running training top-1 over the last epoch (augmented images): far below the validation top-1's
        # ceiling means the cell underfits in its steps rather than overfits.
        "train_top1_last_epoch": train_top1[-1] if train_top1 else None,
        "train_wall_seconds": results.get("wall_seconds"),
        "steps": sum(int(s) for s in steps_per_epoch) if steps_per_epoch else None,
        "images_per_second": results.get("images_per_second"),
        "epochs_run": len(epoch_seconds),
        "epoch_seconds_total": sum(epoch_seconds) if epoch_seconds else None,
        "eval_seconds_total": sum(evals) if evals else None,
        "val_top1_by_epoch": [[e, v, s] for e, v, s in curve],
        "time_to_target": time_to_targets(curve, settings.targets, history),
        "base_lr": config.get("base_lr"),
        "peak_learning_rate": peak_learning_rate(config, batch),
        "resolved": {k: config.get(k) for k in ("optimizer", "lr_schedule", "warmup_epochs", "momentum",
                                                 "weight_decay", "label_smoothing", "lars_eta", "batch_schedule")},
    }


# ---------------------------------------------------------------------------------------------------------------
# Load: the kernel's 1-minute average, and the same average over the threads of other processes only.
# ---------------------------------------------------------------------------------------------------------------


def runnable_threads(cell_session: int | None) -> tuple | None:
    """Counts runnable (R) and uninterruptible (D) threads, as the kernel's load average does.

    Args:
        cell_session: the session id of the running cell (its process group leader), or None.

    Returns:
        (other, cell): threads outside this study process and the cell's session, and threads of the cell; None
        without a readable /proc.
    """
    own = os.getpid()
    other = cell = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if int(pid) == own:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in ("R", "D"):
                continue
            if cell_session is not None and int(fields[3]) == cell_session:
                cell += 1
            else:
                other += 1
    return other, cell


class LoadMonitor:
    """Samples the load while a cell runs.

    `os.getloadavg()` counts the cell itself (its threads keep a 2-core machine's load near or above 2), so the
    `loaded` flag uses the load of the *other* processes: the runnable threads outside the cell and this study
    process, sampled every `interval` seconds and averaged with the kernel's 1-minute decay `exp(-interval/60)`.
    """

    def __init__(self, interval: float):
        self.interval = interval
        self._decay = math.exp(-interval / 60.0)
        self.loadavg_max = 0.0
        self.other_ema = None
        self.other_ema_max = None
        self.other_samples, self.cell_samples = [], []

    def start(self):
        """Seeds the average of the other processes with a few samples before the cell starts."""
        samples = []
        for _ in range(3):
            counts = runnable_threads(None)
            if counts is None:
                return
            samples.append(counts[0])
            time.sleep(0.1)
        self.other_ema = self.other_ema_max = sum(samples) / len(samples)

    def sample(self, cell_session):
        self.loadavg_max = max(self.loadavg_max, os.getloadavg()[0])
        counts = runnable_threads(cell_session)
        if counts is None:
            return
        other, cell = counts
        self.other_samples.append(other)
        self.cell_samples.append(cell)
        base = self.other_ema if self.other_ema is not None else float(other)
        self.other_ema = base * self._decay + other * (1 - self._decay)
        self.other_ema_max = max(self.other_ema_max or 0.0, self.other_ema)

    def summary(self, threshold: float) -> dict:
        measured = self.other_ema_max is not None
        return {
            "loadavg_1min_max": self.loadavg_max,
            "other_load_1min_max": self.other_ema_max,
            "other_runnable_mean": (sum(self.other_samples) / len(self.other_samples)) if self.other_samples else None,
            "cell_runnable_mean": (sum(self.cell_samples) / len(self.cell_samples)) if self.cell_samples else None,
            "load_samples": len(self.other_samples),
            "load_threshold": threshold,
            # Without /proc, fall back to the whole machine's load average (which includes the cell).
            "loaded": bool(self.other_ema_max > threshold) if measured else bool(self.loadavg_max > threshold),
            "load_measure": "other_processes" if measured else "loadavg_including_cell",
        }


# ---------------------------------------------------------------------------------------------------------------
# Running one cell.
# ---------------------------------------------------------------------------------------------------------------


def _kill_group(proc):
    """Stops the cell's process group (SIGTERM, then SIGKILL after a grace period)."""
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE_SECONDS), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path, chars=2000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def run_cell(cell: Cell, settings: Settings, timeout: float, resolved: dict | None = None) -> dict:
    """Runs one cell from scratch and returns its record (also written to its JSON).

    The cell's model directory is deleted first. train.py runs in its own session (process group) with stdout and
    stderr going to `<study_dir>/logs/<cell_id>.log`; after `timeout` seconds the whole group is killed.
    """
    model_dir = os.path.join(settings.study_dir, "cells", cell.cell_id)
    path = record_path(settings, cell)
    if os.path.exists(path):
        os.remove(path)  # a partial or stale record: this run replaces it
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    log_path = os.path.join(settings.study_dir, "logs", cell.cell_id + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    args = cell.train_args(settings)
    command = [sys.executable, settings.train_script, *args]
    monitor = LoadMonitor(settings.load_sample_seconds)
    monitor.start()
    loadavg_start = list(os.getloadavg())
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    start = time.monotonic()
    status = None
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while True:
                try:
                    proc.wait(timeout=settings.load_sample_seconds)
                    break
                except subprocess.TimeoutExpired:
                    monitor.sample(proc.pid)
                if time.monotonic() - start > timeout:
                    status = "timeout"
                    _kill_group(proc)
                    break
        except BaseException:  # Ctrl-C or an error of the study itself: the cell must not outlive it
            _kill_group(proc)
            raise
    wall = time.monotonic() - start
    loadavg_end = list(os.getloadavg())
    log_tail = _tail(log_path)
    results = load_record(os.path.join(model_dir, "results.json"))
    if status is None:
        if proc.returncode == 0 and results is not None:
            status = "ok"
        elif re.search(r"loss became NaN|NaN or infinite", log_tail):
            status = "diverged"  # train.py's TrainingDivergedError: a result (the learning rate is too high)
        else:
            status = "failed"
    record = {
        "schema": SCHEMA_VERSION,
        "cell_id": cell.cell_id,
        "recipe": cell.recipe,
        "global_batch_size": cell.batch,
        "epochs": cell.epochs,
        "seed": cell.seed,
        "role": cell.role,
        "lr_factor": cell.lr_factor,
        "variant": cell.variant,
        "variant_flags": list(cell.variant_flags),
        "train_args": args,
        "command": shlex.join(command),
        "returncode": proc.returncode,
        "status": status,
        "wall_seconds": wall,
        "started_at": started_at,
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg_end,
        "timeout_seconds": timeout,
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    record.update(monitor.summary(settings.load_threshold))
    if status == "ok":
        record.update(summarize_results(results, settings, cell.batch))
    else:
        record["error_tail"] = log_tail[-1500:]
        if resolved:
            record["base_lr"] = resolved.get("base_lr")
            record["peak_learning_rate"] = peak_learning_rate(resolved, cell.batch)
    record["complete"] = status in FINISHED_STATUSES
    write_json_atomic(path, record)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Estimates.
# ---------------------------------------------------------------------------------------------------------------


def _interpolate(points, batch):
    """Linear interpolation in log2(batch) through (batch, seconds) points; linear extrapolation beyond them."""
    if len(points) == 1:
        return points[0][1]
    x = math.log2(batch)
    xs = [(math.log2(b), s) for b, s in points]
    if x <= xs[0][0]:
        (x0, y0), (x1, y1) = xs[0], xs[1]
    elif x >= xs[-1][0]:
        (x0, y0), (x1, y1) = xs[-2], xs[-1]
    else:
        i = next(i for i in range(1, len(xs)) if x <= xs[i][0])
        (x0, y0), (x1, y1) = xs[i - 1], xs[i]
    return max(1.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def measured_epoch_seconds(records) -> dict:
    """batch -> median training seconds per epoch (validation excluded) over finished cells."""
    per_batch = {}
    for r in records:
        if r.get("status") == "ok" and r.get("epoch_seconds_total") and r.get("epochs_run"):
            train = r["epoch_seconds_total"] - (r.get("eval_seconds_total") or 0.0)
            per_batch.setdefault(r["global_batch_size"], []).append(train / r["epochs_run"])
    return {b: statistics.median(v) for b, v in per_batch.items()}


def estimate_cell_seconds(cell: Cell, settings: Settings, measured: dict | None = None) -> float:
    """Estimated wall seconds of a cell: overhead + epochs x (training epoch + validation share)."""
    points = dict(settings.estimate_epoch_seconds)
    points.update(measured or {})
    epoch = _interpolate(sorted(points.items()), cell.batch)
    evals = cell.epochs // settings.eval_every_epochs
    return settings.estimate_cell_overhead_seconds + cell.epochs * epoch + evals * settings.estimate_eval_seconds


def _hours(seconds):
    return f"{seconds / 3600:.1f} h ({seconds / 60:,.0f} min)"


# ---------------------------------------------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------------------------------------------


def _ok(records):
    return [r for r in records if r.get("status") == "ok" and _finite(r.get("top1"))]


def _mean_spread(values):
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def analyse(settings: Settings, records: list) -> dict:
    """The study's answers from the finished cell records.

    The figure of a (recipe, batch) entry is the mean top-1 over its seeds (seed 0 of the grid and the extra seeds
    at the same batch and E); at the largest batch it is the best over the tuning cells (the recipe's own learning
    rate included). The baseline is the baseline recipe at the baseline batch (mean over its seeds). The critical
    batch of a recipe is the largest batch whose figure is within 1.0 point of the baseline.
    """
    E = settings.epochs
    finished = {r["cell_id"]: r for r in records if r.get("status") in FINISHED_STATUSES}
    entries = {}
    for recipe in settings.recipes:
        for batch in settings.batches:
            same = [r for r in finished.values() if r.get("recipe") == recipe and r.get("global_batch_size") == batch
                    and r.get("epochs") == E and r.get("lr_factor", 1.0) == 1.0 and not r.get("variant")]
            seeds = _ok(same)
            mean, spread = _mean_spread([r["top1"] for r in seeds])
            entry = {"mean": mean, "spread": spread, "n": len(seeds), "diverged": any(
                r.get("status") == "diverged" for r in same) and not seeds, "cells": [r["cell_id"] for r in same],
                "tuned": False, "lr_factor": 1.0}
            if batch == settings.largest_batch:
                tuned = [r for r in finished.values() if r.get("recipe") == recipe and r.get("role") == "tuning"
                         and r.get("global_batch_size") == batch and r.get("epochs") == E]
                entry["tuning"] = sorted(
                    [{"lr_factor": 1.0, "peak_learning_rate": s.get("peak_learning_rate"), "top1": s.get("top1"),
                      "status": s.get("status"), "cell_id": s["cell_id"]} for s in same if s.get("seed") == 0]
                    + [{"lr_factor": r.get("lr_factor"), "peak_learning_rate": r.get("peak_learning_rate"),
                        "top1": r.get("top1"), "status": r.get("status"), "cell_id": r["cell_id"]} for r in tuned],
                    key=lambda t: t["lr_factor"])
                best = max(_ok(tuned), key=lambda r: r["top1"], default=None)
                if best is not None and (mean is None or best["top1"] > mean):
                    entry.update(mean=best["top1"], spread=None, n=1, tuned=True, lr_factor=best["lr_factor"],
                                 diverged=False, cells=[best["cell_id"]])
            entries[(recipe, batch)] = entry
    base = entries.get((settings.baseline_recipe, settings.baseline_batch), {})
    baseline = base.get("mean")
    critical = {}
    for recipe in settings.recipes:
        within = [b for b in settings.batches if baseline is not None and entries[(recipe, b)]["mean"] is not None
                  and entries[(recipe, b)]["mean"] >= baseline - 0.01]
        critical[recipe] = max(within) if within else None
    check = None
    long_run = finished.get(Cell(settings.baseline_recipe, settings.baseline_batch, 2 * E, 0,
                                 "baseline_check").cell_id)
    short_run = finished.get(Cell(settings.baseline_recipe, settings.baseline_batch, E, 0, "grid").cell_id)
    if long_run and short_run and _ok([long_run]) and _ok([short_run]):
        diff = long_run["top1"] - short_run["top1"]
        check = {"top1_E": short_run["top1"], "top1_2E": long_run["top1"], "difference_points": 100 * diff,
                 "converged": abs(diff) < 0.003}
    return {"entries": entries, "baseline": baseline, "baseline_spread": base.get("spread"),
            "baseline_n": base.get("n", 0), "critical_batch": critical, "convergence": check,
            "ablations": _ablations(settings, finished)}


def _ablations(settings, finished):
    """Each --ablation variant's finished cell against the recipe's own grid cell (same batch, E, seed 0).

    Returns:
        {"reference": the grid cell's record or None, "rows": [{"name", "flags", "record" (or None)}]}.
    """
    reference = finished.get(Cell(settings.ablation_recipe, settings.ablation_batch, settings.epochs, 0,
                                  "grid").cell_id)
    rows = []
    for cell in ablation_cells(settings):
        rows.append({"name": cell.variant, "flags": list(cell.variant_flags), "record": finished.get(cell.cell_id)})
    return {"reference": reference, "rows": rows}


def goals(settings: Settings, analysis: dict) -> list:
    """The issue's two goals, each as (text, verdict) with verdict "met", "not met" or "not measured"."""
    out = []
    critical = analysis["critical_batch"]
    baseline = analysis["baseline"]
    others = [r for r in settings.recipes if r != "naive"]
    if "naive" in settings.recipes and others:
        known = {r: critical[r] for r in others if critical[r] is not None}
        if critical.get("naive") is None or not known:
            verdict, text = "not measured", "no critical batch measured yet"
        else:
            best = max(known, key=known.get)
            ratio = known[best] / critical["naive"]
            verdict = "met" if ratio >= 4 else "not met"
            text = f"{best}: {known[best]} vs naive: {critical['naive']} ({ratio:g}x)"
        out.append(("The best recipe's critical batch is >= 4x naive SGD's", text, verdict))
        b = settings.seed_batch
        if b in settings.batches and baseline is not None:
            naive = analysis["entries"][("naive", b)]["mean"]
            vals = {r: analysis["entries"][(r, b)]["mean"] for r in others}
            vals = {r: v for r, v in vals.items() if v is not None}
            if naive is None or not vals:
                out.append((f"At batch {b} the best recipe is within 1.0 point of the baseline and naive is >= 3 "
                            "points below", "not all cells measured yet", "not measured"))
            else:
                best = max(vals, key=vals.get)
                gap_best = 100 * (baseline - vals[best])
                gap_naive = 100 * (baseline - naive)
                met = gap_best <= 1.0 and gap_naive >= 3.0
                out.append((f"At batch {b} the best recipe is within 1.0 point of the baseline and naive is >= 3 "
                            "points below", f"{best} {_gap_text(gap_best)} the baseline, naive "
                            f"{_gap_text(gap_naive)}", "met" if met else "not met"))
    return out


def _gap_text(points_below):
    """'3.05 points below' / '0.20 points above' for a gap in points (positive: below the baseline)."""
    return f"{abs(points_below):.2f} points {'below' if points_below >= 0 else 'above'}"


# ---------------------------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------------------------


def _pct(x, digits=2):
    return f"{100 * x:.{digits}f}%" if _finite(x) else "—"


def _entry_text(entry):
    if entry is None or (entry["mean"] is None and not entry["diverged"]):
        return "—"
    if entry["mean"] is None:
        return "diverged"
    text = f"{100 * entry['mean']:.2f}"
    if entry["n"] > 1:
        text += f" ± {100 * entry['spread']:.2f} ({entry['n']} seeds)"
    if entry["tuned"]:
        text += f" (LR x{entry['lr_factor']:g})"
    return text


def plot_top1_vs_batch(settings, analysis, path):
    """Top-1 (%) against global batch (log2 axis), one line per recipe, the baseline's +-1 point band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for recipe in settings.recipes:
        points = [(b, analysis["entries"][(recipe, b)]) for b in settings.batches]
        points = [(b, e) for b, e in points if e["mean"] is not None]
        if not points:
            continue
        ax.errorbar([b for b, _ in points], [100 * e["mean"] for _, e in points],
                    yerr=[100 * (e["spread"] or 0) for _, e in points], marker="o", capsize=3, label=recipe)
    if analysis["baseline"] is not None:
        base = 100 * analysis["baseline"]
        ax.axhspan(base - 1, base + 1, color="grey", alpha=0.2, label="baseline ± 1 point")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(settings.batches), [str(b) for b in settings.batches])
    ax.set_xlabel("global batch (images per step)")
    ax.set_ylabel(f"top-1 after {settings.epochs} epochs (%)")
    ax.set_title("Top-1 against global batch at a fixed epoch budget")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing drawn yet: no empty legend (and no matplotlib warning)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_val_curves(settings, analysis, records, path, batch=None):
    """Validation top-1 (%) against epoch at `batch` (default: the largest; each recipe's reported cell), baseline
    dashed. Returns the number of recipe curves drawn; with none, no file is written."""
    batch = settings.largest_batch if batch is None else batch
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_id = {r["cell_id"]: r for r in records}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for recipe in settings.recipes:
        entry = analysis["entries"][(recipe, batch)]
        record = by_id.get(entry["cells"][0]) if entry["cells"] and entry["mean"] is not None else None
        curve = [(e, v) for e, v, _ in (record or {}).get("val_top1_by_epoch") or [] if v is not None]
        if curve:
            label = recipe + (f" (LR x{entry['lr_factor']:g})" if entry["tuned"] else "")
            ax.plot([e for e, _ in curve], [100 * v for _, v in curve], marker=".", label=label)
            drawn += 1
    base = analysis["entries"].get((settings.baseline_recipe, settings.baseline_batch))
    base_record = by_id.get(Cell(settings.baseline_recipe, settings.baseline_batch, settings.epochs, 0,
                                 "grid").cell_id) if base else None
    curve = [(e, v) for e, v, _ in (base_record or {}).get("val_top1_by_epoch") or [] if v is not None]
    if curve:
        ax.plot([e for e, _ in curve], [100 * v for _, v in curve], "k--", label=f"baseline (batch "
                f"{settings.baseline_batch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"Validation top-1 during training, global batch {batch}")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _command_text(flags_obj) -> str:
    """The study's command line with the flags given explicitly; --dry_run, --report_only and --cells (which pick
    what one invocation does, not what the study is) are left out, so the command regenerates the whole study."""
    args = []
    for name in _STUDY_FLAGS:
        flag = flags_obj[name]
        if not flag.present or name in ("dry_run", "report_only", "cells"):
            continue
        if name in ("train_flag", "ablation"):  # repeatable flags: one option per value
            args += [f"--{name}={v}" for v in flag.value] or [f"--{name}="]
        elif isinstance(flag.value, bool):
            args.append(f"--{name}" if flag.value else f"--no{name}")
        elif isinstance(flag.value, list):
            args.append(f"--{name}={','.join(map(str, flag.value))}")
        else:
            args.append(f"--{name}={flag.value}")
    return shlex.join(["python", "scripts/large_batch_study.py", *args])


def write_doc(settings: Settings, cells: list, records: list, command: str, estimate: dict) -> dict:
    """Writes the Markdown report (and its PNGs beside it) from the finished cell records.

    Returns:
        {"doc_path": str, "plots": [paths]}.
    """
    doc_dir = os.path.dirname(os.path.abspath(settings.doc_path))
    os.makedirs(doc_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(settings.doc_path))[0]
    finished = [r for r in records if r.get("status") in FINISHED_STATUSES]
    failed = [r for r in records if r.get("status") not in FINISHED_STATUSES]
    analysis = analyse(settings, records)
    lines = [f"# The large-batch study{' (quick subset)' if settings.quick else ''}", ""]
    lines += ["How large can the global batch grow with tfscale's recipes before top-1 drops, at a fixed epoch budget? "
              "(issue 14). Every cell is a run of `scripts/train.py` (the default data: ResNet-8 on Fashion-MNIST, "
              "4 replicas on logical CPU devices, unless the command below passes other `--train_flag`s).", ""]
    lines += ["Regenerate with the exact command (resumable: finished cells are kept):", "", "```", command, "```", ""]
    plots = []
    if not finished:
        lines += ["## Status: nothing has been measured yet", "",
                  f"No cell of the study has finished (results directory `{settings.results_dir}`: "
                  f"{len(failed)} failed or timed-out cell(s), {len(cells)} planned). There are no top-1 figures, no "
                  "critical batches and no plots yet; this page only describes the plan. The timed cells need a "
                  "quiet machine, one cell at a time.", ""]
    else:
        lines += [f"## Status: {len(finished)} of {len(cells)} planned cells finished"
                  + (f", {len(failed)} failed or timed out" if failed else ""), ""]
        loaded = [r["cell_id"] for r in finished if r.get("loaded")]
        lines += [f"Measured on {finished[0].get('host', '?')} ({finished[0].get('cpus', '?')} CPUs), "
                  f"{min(r.get('started_at', '') for r in finished)[:10]} to "
                  f"{max(r.get('started_at', '') for r in finished)[:10]}. Cells flagged `loaded` (other processes' "
                  f"1-minute load above {settings.load_threshold:g} during the cell): "
                  + (", ".join(f"`{c}`" for c in loaded) if loaded else "none") + ".", ""]
        lines += _answer_section(settings, analysis)
        lines += _table_section(settings, analysis)
        lines += _time_section(settings, analysis, finished)
        lines += _tuning_section(settings, analysis)
        lines += _ablation_section(settings, analysis)
        top_png = os.path.join(doc_dir, f"{stem}_top1_vs_batch.png")
        plot_top1_vs_batch(settings, analysis, top_png)
        plots.append(top_png)
        # The largest batch, or while the grid is partial the largest batch with a finished cell (said so).
        measured = [b for b in settings.batches if any(analysis["entries"][(r, b)]["mean"] is not None
                                                       for r in settings.recipes)]
        curve_batch = max(measured) if measured else settings.largest_batch
        curve_png = os.path.join(doc_dir, f"{stem}_val_top1_b{curve_batch}.png")
        for stale in glob.glob(os.path.join(doc_dir, f"{stem}_val_top1_b*.png")):
            os.remove(stale)  # an earlier curve (perhaps of a partial grid, at a smaller batch): redrawn below
        if plot_val_curves(settings, analysis, records, curve_png, batch=curve_batch):
            plots.append(curve_png)
        lines += ["## Plots", ""]
        lines += [f"![top-1 against global batch]({os.path.basename(top_png)})", ""]
        if curve_png in plots:
            lines += [f"![validation top-1 against epoch at batch {curve_batch}]"
                      f"({os.path.basename(curve_png)})", ""]
            if curve_batch != settings.largest_batch:
                lines += [f"(At batch {curve_batch}, the largest batch with a finished cell; no cell at batch "
                          f"{settings.largest_batch} has finished yet.)", ""]
        else:
            lines += [f"(No cell at batch {settings.largest_batch} has finished: no validation curve yet.)", ""]
        lines += _cells_section(finished, failed)
    lines += _method_section(settings, cells, records, estimate)
    with open(settings.doc_path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return {"doc_path": settings.doc_path, "plots": plots, "analysis": analysis}


def _answer_section(settings, analysis):
    lines = ["## The answer", ""]
    base = analysis["baseline"]
    if base is None:
        lines += [f"The baseline ({settings.baseline_recipe} at batch {settings.baseline_batch}) has not finished, "
                  "so no critical batch can be given yet.", ""]
    else:
        spread = analysis["baseline_spread"]
        lines += [f"Baseline: {settings.baseline_recipe} at global batch {settings.baseline_batch}, {settings.epochs} "
                  f"epochs: **{100 * base:.2f}%** top-1"
                  + (f" ± {100 * spread:.2f} ({analysis['baseline_n']} seeds)" if spread is not None else
                     " (one seed)") + ".", ""]
        conv = analysis["convergence"]
        if conv:
            lines += [f"Convergence check: top-1 {_pct(conv['top1_E'])} after {settings.epochs} epochs and "
                      f"{_pct(conv['top1_2E'])} after {2 * settings.epochs} ({conv['difference_points']:+.2f} points): "
                      + ("converged (|difference| < 0.3 points)." if conv["converged"] else
                         "**not converged** (|difference| >= 0.3 points): E is too short for a fair study."), ""]
        elif settings.baseline_check:
            lines += [f"Convergence check ({2 * settings.epochs} epochs): not measured yet.", ""]
        lines += ["Critical batch (the largest batch whose top-1 is within 1.0 point of the baseline; at the largest "
                  "batch, after the tuning below):", "", "| recipe | critical batch |", "|---|---|"]
        for recipe in settings.recipes:
            c = analysis["critical_batch"][recipe]
            lines.append(f"| {recipe} | {c if c is not None else 'none measured'} |")
        lines.append("")
    verdicts = goals(settings, analysis)
    if verdicts:
        lines += ["Issue 14's goals:", "", "| goal | measured | verdict |", "|---|---|---|"]
        lines += [f"| {g} | {t} | **{v}** |" for g, t, v in verdicts]
        lines.append("")
    return lines


def _table_section(settings, analysis):
    lines = [f"## Top-1 (%) by recipe and global batch, {settings.epochs} epochs", "",
             "Mean ± sample standard deviation where there are several seeds; at the largest batch, the best of the "
             "tuned learning rates (the factor is shown when it is not the recipe's own rate). — : not measured.", "",
             "| recipe | " + " | ".join(str(b) for b in settings.batches) + " |",
             "|---|" + "---|" * len(settings.batches)]
    for recipe in settings.recipes:
        lines.append(f"| {recipe} | " + " | ".join(_entry_text(analysis["entries"][(recipe, b)])
                                                   for b in settings.batches) + " |")
    return lines + [""]


def _time_section(settings, analysis, finished):
    keys = [f"{t:g}" for t in settings.targets]
    head = " | ".join(f"time to {100 * t:g}% (s) | steps to {100 * t:g}%" for t in settings.targets)
    lines = ["## Time and steps to the targets, throughput", "",
             "Time: training seconds (validation passes excluded, the first step's tracing included) until the first "
             f"validation (every {settings.eval_every_epochs} epoch(s)) at or above the target; steps: optimizer "
             "steps until then. On this one machine a larger batch does not train faster per image; on N devices "
             "the time per step stays roughly constant while the steps shrink with the batch, so the steps column "
             "is what a larger batch buys. Seed-0 cells with the recipe's own learning rate.", "",
             f"| recipe | batch | top-1 | {head} | images/s | wall (s) | loaded |",
             "|---|---|---|" + "---|---|" * len(keys) + "---|---|---|"]
    for recipe in settings.recipes:
        for batch in settings.batches:
            r = next((r for r in finished if r.get("recipe") == recipe and r.get("global_batch_size") == batch
                      and r.get("epochs") == settings.epochs and r.get("seed") == 0
                      and r.get("lr_factor", 1.0) == 1.0 and not r.get("variant")), None)
            if r is None:
                continue
            cols = []
            for k in keys:
                hit = (r.get("time_to_target") or {}).get(k)
                cols += [f"{hit['seconds']:,.0f} (epoch {hit['epoch']})" if hit and _finite(hit.get("seconds"))
                         else "not reached", f"{hit['steps']:,}" if hit and hit.get("steps") is not None else "—"]
            ips = r.get("images_per_second")
            lines.append(f"| {recipe} | {batch} | {_pct(r.get('top1')) if r.get('status') == 'ok' else r['status']} | "
                         + " | ".join(cols) + f" | {f'{ips:,.0f}' if _finite(ips) else '—'} | "
                         f"{r.get('wall_seconds', 0):,.0f} | {'yes' if r.get('loaded') else 'no'} |")
    return lines + [""]


def _tuning_section(settings, analysis):
    lines = [f"## Tuning done (at the largest batch, {settings.largest_batch})", "",
             f"Each recipe gets the same budget: at most {settings.tuning_budget} peak learning rates, its own "
             "times " + ", ".join(f"x{f:g}" for f in (1.0,) + settings.used_tuning_factors) + ". Nothing else was "
             "tuned.", "", "| recipe | LR factor | peak LR | top-1 |", "|---|---|---|---|"]
    for recipe in settings.recipes:
        for t in analysis["entries"][(recipe, settings.largest_batch)].get("tuning", []):
            peak = t.get("peak_learning_rate")
            result = _pct(t["top1"]) if t.get("status") == "ok" else t.get("status")
            lines.append(f"| {recipe} | x{t['lr_factor']:g} | {f'{peak:.4g}' if _finite(peak) else '—'} | "
                         f"{result} |")
    return lines + [""]


def _ablation_section(settings, analysis):
    abl = analysis["ablations"]
    if not abl["rows"]:
        return []
    first = f"{settings.targets[0]:g}"
    lines = [f"## Ablations ({settings.ablation_recipe} at batch {settings.ablation_batch}, {settings.epochs} epochs, "
             "seed 0)", "",
             f"Changes to `{settings.ablation_recipe}` (its own cell is the reference), one at a time and then the "
             "ones that helped together (`--ablation`). These variants "
             "are extra tuning of one recipe, so they are not counted in the table or the goals above; a variant "
             "that works becomes a recipe of its own and is then run over the whole grid with the same budget as the "
             "others.", "",
             f"| variant | train.py flags added | top-1 | vs `{settings.ablation_recipe}` (points) | steps to "
             f"{100 * settings.targets[0]:g}% | loaded |", "|---|---|---|---|---|---|"]
    ref = abl["reference"]
    ref_top1 = ref.get("top1") if ref and ref.get("status") == "ok" and _finite(ref.get("top1")) else None

    def row_line(label, flags_text, r, reference=False):
        if r is None:
            return f"| {label} | {flags_text} | not measured yet | — | — | — |"
        ok = r.get("status") == "ok" and _finite(r.get("top1"))
        if reference:
            delta = "0"
        else:
            delta = f"{100 * (r['top1'] - ref_top1):+.2f}" if ok and ref_top1 is not None else "—"
        hit = (r.get("time_to_target") or {}).get(first) if ok else None
        steps = "—" if not ok else f"{hit['steps']:,}" if hit and hit.get("steps") is not None else "not reached"
        return (f"| {label} | {flags_text} | {_pct(r['top1']) if ok else r.get('status')} | {delta} | {steps} | "
                f"{'yes' if r.get('loaded') else 'no'} |")

    lines.append(row_line("(none: the recipe's own)", "—", ref, reference=True))
    lines += [row_line(row["name"], "`" + " ".join(row["flags"]) + "`", row["record"]) for row in abl["rows"]]
    return lines + [""]


def _cells_section(finished, failed):
    lines = ["## Every cell", "",
             "| cell | role | status | top-1 | top-5 | steps | peak LR | images/s | wall (s) | load avg start → end "
             "| other load (max) | loaded |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(finished + failed, key=lambda r: (r.get("global_batch_size", 0), r.get("cell_id", ""))):
        peak, ips, other = r.get("peak_learning_rate"), r.get("images_per_second"), r.get("other_load_1min_max")
        start, end = r.get("loadavg_start") or [None], r.get("loadavg_end") or [None]
        load = f"{start[0]:.2f} → {end[0]:.2f}" if _finite(start[0]) and _finite(end[0]) else "—"
        lines.append(
            f"| `{r['cell_id']}` | {r.get('role')} | {r.get('status')} | {_pct(r.get('top1'))} | "
            f"{_pct(r.get('top5'))} | {r.get('steps') if r.get('steps') is not None else '—'} | "
            f"{f'{peak:.4g}' if _finite(peak) else '—'} | {f'{ips:,.0f}' if _finite(ips) else '—'} | "
            f"{r.get('wall_seconds', 0):,.0f} | {load} | {f'{other:.2f}' if _finite(other) else '—'} | "
            f"{'yes' if r.get('loaded') else 'no'} |")
    return lines + [""]


def _method_section(settings, cells, records, estimate):
    E = settings.epochs
    lines = ["## Method", "", "### The grid", "",
             f"- Global batches {', '.join(map(str, settings.batches))}; epoch budget E = {E} for every cell.",
             "- Recipes (train.py flags; every other flag keeps train.py's default, and the recipes' epoch "
             f"boundaries are scaled by E/90 by `recipe_hyperparameters(..., train_epochs=E)`):"]
    for recipe in settings.recipes:
        lines.append(f"  - `{recipe}` (`{' '.join(RECIPES[recipe])}`): {RECIPE_DESCRIPTIONS[recipe]}.")
    lines += [f"- Baseline: `{settings.baseline_recipe}` at batch {settings.baseline_batch}"
              + (f", with a convergence check at 2E = {2 * E} epochs" if settings.baseline_check else "") + ".",
              f"- Seeds: {settings.seeds} for the baseline and for the best recipe at batch {settings.seed_batch}"
              + (" (chosen from the seed-0 grid cells when they have finished)" if settings.seeds > 1 else "") + ".",
              f"- Tuning: at most {settings.tuning_budget} peak learning rate(s) per recipe at the largest batch "
              f"({settings.largest_batch}): the recipe's own, times "
              + (", ".join(f"{f:g}" for f in settings.used_tuning_factors) or "nothing else") + " (`--base_lr`).",
              f"- Every cell validates every {settings.eval_every_epochs} epoch(s); top-1/top-5 are train.py's exact "
              "counts over all evaluation images after training; the validation curve is Keras's per-epoch "
              "validation top-1 (mean over replicas, padding weighted out).",
              ""]
    lines += ["### Load", "",
              "Each cell records `os.getloadavg()` at its start and end and the maximum 1-minute load average during "
              "it. The cell itself keeps the 2-core machine's load average near or above 2, so the `loaded` flag "
              "uses the load of the other processes: their runnable threads, sampled every "
              f"{settings.load_sample_seconds:g} s from /proc and averaged with the kernel's 1-minute decay; a cell "
              f"is `loaded` when that average exceeds {settings.load_threshold:g} (`--load_threshold`). "
              "`--rerun_loaded` re-runs such cells.", ""]
    evals = [r for r in records if r.get("status") == "ok" and r.get("eval_seconds_total") and
             r.get("epoch_seconds_total")]
    lines += ["### Cost of validating every epoch", ""]
    if evals:
        share = sum(r["eval_seconds_total"] for r in evals) / sum(r["epoch_seconds_total"] for r in evals)
        lines += [f"Measured over {len(evals)} finished cells: validation took {100 * share:.1f}% of the time in "
                  "the training loop"
                  + (" (over 15%: consider `--eval_every_epochs=2`)." if share > 0.15 else "."), ""]
    else:
        epoch_256 = dict(settings.estimate_epoch_seconds).get(256, settings.estimate_epoch_seconds[0][1])
        lines += [f"Not measured yet (the cells record `eval_seconds` per epoch). Estimated at "
                  f"{settings.estimate_eval_seconds:g} s per pass over the 10,000 test images against about "
                  f"{epoch_256:g} s of training per epoch at batch 256 "
                  f"(~{100 * settings.estimate_eval_seconds / epoch_256:.0f}%), so every epoch is validated.", ""]
    lines += ["### Wall time", "",
              f"Estimated for the {len(cells)} planned cells: **{_hours(estimate['total_seconds'])}**, "
              f"{_hours(estimate['remaining_seconds'])} still to run. Per-epoch training seconds "
              + ", ".join(f"{b}: {s:.0f} s" for b, s in estimate["epoch_seconds_points"])
              + f" ({estimate['epoch_seconds_source']}), interpolated in log2(batch); plus "
              f"{settings.estimate_eval_seconds:g} s per validation and {settings.estimate_cell_overhead_seconds:g} s "
              "per cell. The defaults were measured in the `--quick` cells on the quiet 2-core machine "
              "(docs/large_batch_quick.md: 1,709 training images/s at batch 256, 1,431-1,539 at 4096). "
              "`--dry_run` lists every cell, its train.py command and its estimate.", "",
              "| part | cells | estimated hours |", "|---|---|---|"]
    lines += [f"| {role} | {n} | {seconds / 3600:.1f} |" for role, (n, seconds) in estimate["per_role"].items()]
    lines.append("")
    if estimate["total_seconds"] > _SIX_HOURS * 1.05 and not settings.quick:
        speed = estimate["total_seconds"] / _SIX_HOURS
        lines += [f"**This grid cannot fit the 6-hour target on the 2-core machine**: it needs about "
                  f"{speed:.1f}x the measured training speed (or fewer cells). Shortening E below the baseline's "
                  "convergence would change the study's meaning. The `--quick` subset (batches "
                  f"{' and '.join(QUICK['batches'])}, recipes {' and '.join(QUICK['recipes'])}, E = {QUICK['epochs']}, "
                  f"{len(QUICK['batches']) * len(QUICK['recipes'])} cells, `docs/large_batch_quick.md`) fits in one "
                  "hour; `--cells=REGEX` runs a chosen part of the grid first (e.g. `--cells='^b(256|4096)-'`).", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------------------------------------------


def estimate_grid(settings: Settings, cells: list, records_by_id: dict) -> dict:
    measured = measured_epoch_seconds(list(records_by_id.values()))
    points = dict(settings.estimate_epoch_seconds)
    points.update(measured)
    total = remaining = 0.0
    per_cell, per_role = {}, {}
    for cell in cells:
        seconds = estimate_cell_seconds(cell, settings, measured)
        per_cell[cell.cell_id] = seconds
        count, role_seconds = per_role.get(cell.role, (0, 0.0))
        per_role[cell.role] = (count + 1, role_seconds + seconds)
        total += seconds
        if not is_finished(records_by_id.get(cell.cell_id), cell, settings):
            remaining += seconds
    return {"total_seconds": total, "remaining_seconds": remaining, "per_cell": per_cell, "per_role": per_role,
            "epoch_seconds_points": sorted(points.items()),
            "epoch_seconds_source": ("measured in finished cells where available" if measured else
                                     "--estimate_epoch_seconds")}


def _display_command(settings, cell):
    python = sys.executable
    rel = os.path.relpath(python)
    python = rel if not rel.startswith("..") else python
    script = os.path.relpath(settings.train_script)
    script = script if not script.startswith("..") else settings.train_script
    return shlex.join([python, script, *cell.train_args(settings)])


def _load_records(settings, cells):
    return {c.cell_id: r for c in cells if (r := load_record(record_path(settings, c))) is not None}


def _all_records(settings):
    directory = settings.results_dir
    out = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".json") and not name.startswith("."):
                record = load_record(os.path.join(directory, name))
                if record is not None and record.get("schema") == SCHEMA_VERSION:
                    out.append(record)
    return out


def best_recipe_at(settings: Settings, records_by_id: dict) -> str | None:
    """The recipe with the highest seed-0 top-1 at --seed_batch, once all its grid cells there have finished."""
    grid = [Cell(r, settings.seed_batch, settings.epochs, 0, "grid") for r in settings.recipes]
    if settings.seed_batch not in settings.batches:
        return None
    done = [records_by_id.get(c.cell_id) for c in grid]
    if any(not is_finished(r, c, settings) for r, c in zip(done, grid)):
        return None
    ok = [r for r in done if r.get("status") == "ok" and _finite(r.get("top1"))]
    return max(ok, key=lambda r: r["top1"])["recipe"] if ok else None


def plan(settings: Settings, records_by_id: dict) -> tuple:
    """All planned cells (the best-seed cells as placeholders until the best recipe is known) and the resolved
    train.py configurations of the non-placeholder cells."""
    cells = grid_cells(settings) + ablation_cells(settings)
    largest = [Cell(r, settings.largest_batch, settings.epochs, 0, "grid") for r in settings.recipes]
    resolved = resolve_configs(settings, cells)
    errors = {k: v["error"] for k, v in resolved.items() if "error" in v}
    if errors:
        raise ValueError("train.py rejects the flags of these cells:\n  "
                         + "\n  ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
    if settings.used_tuning_factors:
        base_lrs = {c.recipe: resolved[c.cell_id]["base_lr"] for c in largest}
        cells += tuning_cells(settings, base_lrs)
    cells += best_seed_cells(settings, best_recipe_at(settings, records_by_id))
    return cells, resolved


def run(flags_obj) -> dict:
    """Plans the grid; prints it (--dry_run), or runs the unfinished cells one at a time and writes the doc.

    Returns:
        dict with `cells` (planned cell ids), `ran`, `skipped` and `failed` (cell ids), `estimated_seconds`,
        `remaining_seconds` and `doc_path` (None for --dry_run).
    """
    settings = settings_from_flags(flags_obj)
    command = _command_text(flags_obj)
    records_by_id = {r["cell_id"]: r for r in _all_records(settings)}
    cells, resolved = plan(settings, records_by_id)
    estimate = estimate_grid(settings, cells, records_by_id)
    selected = re.compile(settings.cells_regex) if settings.cells_regex else None
    print(f"Large-batch study: {len(cells)} cells, E = {settings.epochs} epochs, batches "
          f"{list(settings.batches)}, recipes {list(settings.recipes)}, seeds {settings.seeds}, tuning budget "
          f"{settings.tuning_budget}{' (--quick)' if settings.quick else ''}; study dir {settings.study_dir}, "
          f"cell results in {settings.results_dir}")
    if flags_obj["dry_run"].value:
        for i, cell in enumerate(cells, 1):
            done = is_finished(records_by_id.get(cell.cell_id), cell, settings)
            peak = peak_learning_rate(resolved.get(cell.cell_id), cell.batch)
            if cell.base_lr is not None:
                peak = cell.base_lr * cell.batch / 256
            skip = "" if selected is None or selected.search(cell.cell_id) else " [not selected by --cells]"
            print(f"{i:3d}. {cell.cell_id:<28} {cell.role:<15} peak LR "
                  f"{f'{peak:.4g}' if peak is not None else 'chosen later':<8} est. "
                  f"{estimate['per_cell'][cell.cell_id] / 60:5.1f} min{' [finished]' if done else ''}{skip}")
            if cell.placeholder:
                print(f"       (recipe: the best at batch {cell.batch}, chosen when its grid cells have finished)")
            print(f"       {_display_command(settings, cell)}")
        target = 3600.0 if settings.quick else _SIX_HOURS
        fits = (f" (over the {target / 3600:g} h target)" if estimate["total_seconds"] > target * 1.05
                else f" (within the {target / 3600:g} h target)")
        print(f"Estimated wall time: {_hours(estimate['total_seconds'])} for {len(cells)} cells{fits}; "
              f"remaining {_hours(estimate['remaining_seconds'])}. Per-epoch training seconds "
              + ", ".join(f"{b}: {s:.0f}" for b, s in estimate["epoch_seconds_points"])
              + f" ({estimate['epoch_seconds_source']}), + {settings.estimate_eval_seconds:g} s per validation, + "
              f"{settings.estimate_cell_overhead_seconds:g} s per cell.")
        print("By part: " + "; ".join(f"{role} {n} cells {seconds / 3600:.1f} h"
                                      for role, (n, seconds) in estimate["per_role"].items()))
        return {"cells": [c.cell_id for c in cells], "ran": [], "skipped": [], "failed": [],
                "estimated_seconds": estimate["total_seconds"], "remaining_seconds": estimate["remaining_seconds"],
                "doc_path": None}
    ran, skipped, failed = [], [], []
    if not flags_obj["report_only"].value:
        queue = list(cells)
        while queue:
            cell = queue.pop(0)
            if cell.placeholder:
                best = best_recipe_at(settings, records_by_id)
                if best is None:
                    print(f"skip {cell.cell_id}: the best recipe at batch {cell.batch} is not known (its grid "
                          "cells have not all finished)")
                    continue
                new = [c for c in best_seed_cells(settings, best) if c.cell_id not in {x.cell_id for x in cells}]
                queue = [c for c in queue if not c.placeholder]
                cells = [c for c in cells if not c.placeholder] + new
                queue = new + queue
                continue
            if is_finished(records_by_id.get(cell.cell_id), cell, settings):
                skipped.append(cell.cell_id)
                r = records_by_id[cell.cell_id]
                print(f"skip {cell.cell_id}: finished ({r['status']}"
                      + (f", top-1 {100 * r['top1']:.2f}%" if _finite(r.get("top1")) else "") + ")")
                continue
            if selected is not None and not selected.search(cell.cell_id):
                continue
            timeout = settings.cell_timeout_seconds or max(1800.0, 3 * estimate_cell_seconds(
                cell, settings, measured_epoch_seconds(list(records_by_id.values()))))
            print(f"run  {cell.cell_id} (timeout {timeout:,.0f} s): {_display_command(settings, cell)}", flush=True)
            record = run_cell(cell, settings, timeout, resolved.get(cell.cell_id))
            records_by_id[cell.cell_id] = record
            (ran if record["complete"] else failed).append(cell.cell_id)
            top1 = f", top-1 {100 * record['top1']:.2f}%" if _finite(record.get("top1")) else ""
            print(f"done {cell.cell_id}: {record['status']}{top1}, {record['wall_seconds']:,.0f} s, loaded "
                  f"{record['loaded']}", flush=True)
            write_json_atomic(os.path.join(settings.study_dir, "study.json"), _study_json(settings, cells,
                                                                                       records_by_id))
        print(f"cells: {len(ran)} run, {len(skipped)} skipped (finished), {len(failed)} failed or timed out")
    records = _all_records(settings)
    records_by_id = {r["cell_id"]: r for r in records}
    if os.path.isdir(settings.study_dir):  # --report_only on a study that never ran creates nothing
        write_json_atomic(os.path.join(settings.study_dir, "study.json"), _study_json(settings, cells, records_by_id))
    estimate = estimate_grid(settings, cells, records_by_id)
    planned = {c.cell_id for c in cells}
    doc = write_doc(settings, cells, [r for r in records if r["cell_id"] in planned], command, estimate)
    print(f"Wrote {doc['doc_path']}" + (f" and {', '.join(doc['plots'])}" if doc["plots"] else ""))
    return {"cells": [c.cell_id for c in cells], "ran": ran, "skipped": skipped, "failed": failed,
            "estimated_seconds": estimate["total_seconds"], "remaining_seconds": estimate["remaining_seconds"],
            "doc_path": doc["doc_path"]}


def _study_json(settings, cells, records_by_id):
    return {"schema": SCHEMA_VERSION, "settings": dataclasses.asdict(settings),
            "planned": [c.cell_id for c in cells],
            "cells": {c.cell_id: records_by_id[c.cell_id] for c in cells if c.cell_id in records_by_id}}


def _stop(signum, frame):
    """SIGTERM stops the study like Ctrl-C: the running cell's process group is killed, not orphaned."""
    del frame
    sys.exit(128 + signum)


def main(_):
    signal.signal(signal.SIGTERM, _stop)
    try:
        result = run(FLAGS)
    except (ValueError, RuntimeError) as e:  # bad flags, or train.py's resolve_config could not run
        sys.exit(f"large_batch_study.py: error: {e}")
    if result["failed"]:
        sys.exit(f"large_batch_study.py: {len(result['failed'])} cell(s) failed or timed out: "
                 f"{', '.join(result['failed'])} (their logs are in the study's logs/; a rerun retries them)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
