"""Errors raised while reading or writing checkpoints; each names the file and what was expected."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, of an unsupported kind, or does not fit the model."""
