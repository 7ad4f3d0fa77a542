"""tfscale.data."""
