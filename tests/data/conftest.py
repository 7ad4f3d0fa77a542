"""Fixtures shared by the tfscale.data tests: small ImageNet-format record sets with known content."""

import numpy as np
import pytest

from datahelpers import smooth_images
from tfscale.data import records


@pytest.fixture(scope="module")
def unique_label_records(tmp_path_factory):
    """24 records of 40x32 colour JPEGs with unique labels 1..24, in 8 shards; returns (pattern, images)."""
    d = tmp_path_factory.mktemp("unique")
    images = smooth_images(24, 40, 32)
    labels = np.arange(24)
    info = records.convert_arrays(images, labels, str(d), "train", 8, progress=False)
    return info["file_pattern"], images
