"""tfscale.optimizers."""
