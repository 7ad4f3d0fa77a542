"""The seed papers' optimisation hyperparameters, by name (`--recipe` in `scripts/train.py`).

`recipe_hyperparameters(name, global_batch_size)` returns a plain dict that
`build_learning_rate_schedule` and `build_optimizer` (in `tfscale.optimizers.factory`)
consume; flags given explicitly on the command line override its entries. Each value
carries its source in a comment; values marked *(reference code)* come from the papers'
released code rather than their text, *(unconfirmed)* ones are our best reading and
should be checked before quoting a reproduction.
"""

from tfscale.optimizers._common import _check_number, _check_positive_int
from tfscale.optimizers.schedules import mlperf_lars_hyperparameters, scaled_learning_rate

__all__ = ["RECIPE_NAMES", "recipe_hyperparameters"]

RECIPE_NAMES = ("akiba", "goyal", "mikami", "mlperf")

# ImageNet training length the recipes' epoch boundaries refer to (Goyal et al.: 90 epochs).
_REFERENCE_EPOCHS = 90


def recipe_hyperparameters(name, global_batch_size, train_epochs=None):
    """The hyperparameters of a paper's recipe at a global batch size.

    Recipes:

    * `"mlperf"`: LARS + linear warm-up + polynomial decay (power 2) to 1e-4, the
      MLPerf ResNet-50 table (You et al., arXiv:1708.03888; Ying et al.,
      arXiv:1811.06992; MLPerf v0.5 reference code).
    * `"goyal"`: momentum SGD, linear scaling `0.1 * B / 256`, 5-epoch gradual warm-up
      from 0.1, x0.1 at epochs 30, 60, 80 (Goyal et al., arXiv:1706.02677).
    * `"akiba"`: RMSprop warm-up + slow-start schedule, `0.1 * B / 256`
      (Akiba et al., arXiv:1711.04325, reference code).
    * `"mikami"`: batch-size control (the batch doubles after the first third of
      training), label smoothing 0.1, momentum SGD with linear scaling and warm-up
      (Mikami et al., arXiv:1811.05233; see the comments for what is unconfirmed).

    Args:
        name: one of `RECIPE_NAMES`.
        global_batch_size: int > 0, images per optimizer step over all replicas (for
            `"mikami"`, the batch of the first phase).
        train_epochs: optional float > 0, the planned training length in epochs. The
            recipes' epoch boundaries (Goyal's 30/60/80, Akiba's 40/70/85, Mikami's
            batch switch) refer to 90-epoch ImageNet runs; when given, they are scaled
            by `train_epochs / 90` so that a short run
            keeps the recipe's shape (Mikami's switch is rounded to an integer epoch
            >= 1). Defaults to None (the papers' epochs).

    Returns:
        dict with keys:
            `optimizer` (str, a `build_optimizer` name), `lr_schedule` (str, a
            `build_learning_rate_schedule` name), `learning_rate` (float, the peak or
            base rate), `base_lr` (float, the same per 256 images:
            `learning_rate * 256 / global_batch_size`, for a `--base_lr` flag that
            applies the linear-scaling rule), `warmup_epochs` (float), `schedule_params` (dict),
            `momentum` (float), `weight_decay` (float), `nesterov` (bool),
            `label_smoothing` (float), `lars_eta` (float or None),
            `optimizer_params` (dict, extra keyword arguments of `build_optimizer`),
            `batch_schedule` (str like `"0:4096,30:8192"`, or None) and
            `reference` (str, the arXiv id).

    Raises:
        ValueError: on an unknown `name` (the message lists the valid names) or a
            non-positive batch or `train_epochs`.

    Example:
        >>> recipe_hyperparameters("mlperf", 4096)["learning_rate"]
        10.0
    """
    if name not in RECIPE_NAMES:
        raise ValueError(f"Unknown recipe {name!r}; expected one of {sorted(RECIPE_NAMES)}")
    global_batch_size = _check_positive_int("global_batch_size", global_batch_size)
    if train_epochs is not None:
        train_epochs = _check_number("train_epochs", train_epochs, minimum=0.0, strict=True)
    recipe = _recipe(name, global_batch_size, train_epochs)
    recipe["base_lr"] = recipe["learning_rate"] * 256 / global_batch_size  # linear-scaling form
    return recipe


def _recipe(name, global_batch_size, train_epochs):
    """The recipe dict without `base_lr`; arguments already checked."""
    scale = 1.0 if train_epochs is None else train_epochs / _REFERENCE_EPOCHS

    def epochs(values):
        """The papers' epoch values (for 90-epoch runs), scaled to `train_epochs`."""
        return [float(v) * scale for v in values]

    if name == "mlperf":
        table = mlperf_lars_hyperparameters(global_batch_size)
        return {
            "optimizer": "lars",  # You et al., arXiv:1708.03888
            "lr_schedule": "warmup_poly",  # MLPerf: linear warm-up, then polynomial decay
            "learning_rate": table["peak_learning_rate"],  # 10 / 25 / 31.2 (reference code)
            "warmup_epochs": epochs([table["warmup_epochs"]])[0],  # 5 or 25 (reference code)
            "schedule_params": {
                "power": table["power"],  # 2 (MLPerf reference code)
                "end_learning_rate": table["end_learning_rate"],  # 1e-4 (MLPerf reference code)
            },
            "momentum": table["momentum"],  # 0.9 (MLPerf reference code)
            "weight_decay": table["weight_decay"],  # 1e-4 (MLPerf v0.5 reference code)
            "nesterov": False,
            "label_smoothing": 0.1,  # Ying et al., arXiv:1811.06992 / Szegedy arXiv:1512.00567
            "lars_eta": table["eta"],  # 0.001 (You et al.; MLPerf reference code)
            "optimizer_params": {"lars_epsilon": table["epsilon"]},  # 0.0 (reference code)
            "batch_schedule": None,
            "reference": "arXiv:1708.03888",
        }
    if name == "goyal":
        return {
            "optimizer": "sgd",  # momentum SGD (Goyal et al., arXiv:1706.02677)
            "lr_schedule": "warmup_piecewise",
            "learning_rate": scaled_learning_rate(0.1, global_batch_size),  # 0.1*B/256
            "warmup_epochs": epochs([5])[0],  # 5-epoch gradual warm-up
            "schedule_params": {
                "boundaries": epochs([30, 60, 80]),  # x0.1 at 30, 60, 80
                "multipliers": [1.0, 0.1, 0.01, 0.001],
                # Gradual warm-up from eta = 0.1 (the 256-image rate), Goyal et al.
                "warmup_start_learning_rate": min(0.1, scaled_learning_rate(0.1, global_batch_size)),
            },
            "momentum": 0.9,  # Goyal et al.
            "weight_decay": 1e-4,  # Goyal et al.
            "nesterov": False,
            "label_smoothing": 0.0,  # not used by Goyal et al.
            "lars_eta": None,
            "optimizer_params": {},
            "batch_schedule": None,
            "reference": "arXiv:1706.02677",
        }
    if name == "akiba":
        return {
            "optimizer": "rmsprop_warmup",  # Akiba et al., arXiv:1711.04325
            "lr_schedule": "slow_start",
            "learning_rate": scaled_learning_rate(0.1, global_batch_size),  # 0.1*B/256 (reference code)
            "warmup_epochs": 0.0,  # the warm-up is the RMSprop blend, not the LR
            "schedule_params": {
                "boundaries": epochs([40, 70, 85]),  # (reference code)
                "multipliers": [0.5, 0.075, 0.01, 0.001],  # (reference code)
            },
            "momentum": 0.9,  # mu1 (reference code)
            "weight_decay": 1e-4,  # (unconfirmed; Chainer's ImageNet example value)
            "nesterov": False,
            "label_smoothing": 0.0,  # not among the paper's techniques
            "lars_eta": None,
            "optimizer_params": {
                "rho": 0.99,  # mu2 (reference code)
                "epsilon": 1e-8,  # (reference code)
                "rmsprop_learning_rate": 3e-4,  # eta_rms (reference code)
                # beta_c = 10, beta_p = 5 epochs (reference code), scaled like the boundaries.
                "blend_center_epochs": epochs([10])[0],
                "blend_period_epochs": epochs([5])[0],
            },
            "batch_schedule": None,
            "reference": "arXiv:1711.04325",
        }
    # mikami
    # (unconfirmed) epoch where 34k -> 68k: one third of training, an integer epoch >= 1.
    switch = max(1, round(30 * scale))
    return {
        "optimizer": "sgd",  # (unconfirmed) momentum SGD
        "lr_schedule": "warmup_poly",  # (unconfirmed) warm-up then smooth decay
        "learning_rate": scaled_learning_rate(0.1, global_batch_size),  # linear scaling (unconfirmed)
        "warmup_epochs": epochs([5])[0],  # (unconfirmed) as Goyal et al.
        "schedule_params": {"power": 2.0, "end_learning_rate": 0.0},  # (unconfirmed)
        "momentum": 0.9,  # (unconfirmed)
        "weight_decay": 1e-4,  # (unconfirmed)
        "nesterov": False,
        "label_smoothing": 0.1,  # Mikami et al., arXiv:1811.05233 (label smoothing)
        "lars_eta": None,
        "optimizer_params": {},
        # Batch-size control: 34k -> 68k in the paper, i.e. B then 2B (Mikami et al.).
        "batch_schedule": f"0:{global_batch_size},{switch}:{2 * global_batch_size}",
        "reference": "arXiv:1811.05233",
    }
