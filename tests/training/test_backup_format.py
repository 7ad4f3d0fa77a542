"""Fails loudly if Keras changes BackupAndRestore's metadata format, which batch-size control reads to resume in
the right phase (a silent change would resume a run in the wrong batch-size phase)."""

import json
import os

import keras
import numpy as np

from tfscale import _tf_compat


def test_backup_metadata_format(tmp_path):
    x, y = np.ones((8, 2), "float32"), np.ones((8, 1), "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    model.fit(x, y, epochs=3, batch_size=4, verbose=0, callbacks=[backup])
    weights, metadata = _tf_compat.backup_file_paths(backup)
    assert os.path.exists(weights) and os.path.exists(metadata), sorted(os.listdir(tmp_path))
    with open(metadata) as f:
        meta = json.load(f)
    assert isinstance(meta, dict) and meta.get("epoch") == 3, meta  # Epochs done, 1-based count.
    assert _tf_compat.backup_restored_epoch(backup) == 3
    # A resumed fit with this callback starts at epoch 3 (and so runs epochs 3 and 4 of 5).
    history = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    history.compile("sgd", "mse")
    ran = history.fit(x, y, epochs=5, batch_size=4, verbose=0,
                      callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)])
    assert ran.epoch == [3, 4]
