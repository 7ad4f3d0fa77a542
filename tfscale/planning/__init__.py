"""tfscale.planning."""
