"""tfscale.distribute."""
