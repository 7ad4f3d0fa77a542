"""tfscale.layers."""
