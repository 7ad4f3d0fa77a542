"""Model definitions, installed as `tfscale.models`."""
