"""tfscale: large-batch, many-device training of image classifiers for TensorFlow/Keras 3."""

import re
from pathlib import Path

from setuptools import setup

_HERE = Path(__file__).parent
_VERSION = re.search(
    r'^__version__ = "([^"]+)"', (_HERE / "tfscale" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="tfscale",
    version=_VERSION,
    description=(
        "2D-torus and hierarchical all-reduce, LARS, group BN and a fast ImageNet "
        "input pipeline for TensorFlow / Keras 3."
    ),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `models/` lives at the top of the repository and is installed as `tfscale.models`,
    # so it never collides with another package's bare `models`.
    packages=[
        "tfscale",
        "tfscale.data",
        "tfscale.distribute",
        "tfscale.layers",
        "tfscale.optimizers",
        "tfscale.planning",
        "tfscale.training",
        "tfscale.models",
    ],
    package_dir={"tfscale.models": "models"},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "tensorboard>=2.16",
        "absl-py>=1.0",
        "numpy>=1.23",
    ],
    extras_require={
        "datasets": ["tensorflow-datasets>=4.9"],
        "plot": ["matplotlib>=3.5"],
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "tensorflow-datasets>=4.9",
            "matplotlib>=3.5",
            "scikit-learn>=1.0",
            "scikit-image>=0.20",
            "pillow>=9",
        ],
        # Horovod 0.28.1 does not build against TF >= 2.19 and is broken under Keras 3
        # (see docs/horovod.md); keep it in its own pinned environment.
        "horovod": ["horovod==0.28.1"],
    },
    entry_points={},
)
