"""tfscale.training."""
