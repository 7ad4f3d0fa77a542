"""tfscale: train image classifiers with very large batches on many devices.

The public surface is re-exported here; everything else is private.
"""

__version__ = "0.1.0"
