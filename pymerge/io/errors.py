"""Errors the I/O layer raises; all are ValueErrors so callers can catch bad input in one place."""


class CheckpointError(ValueError):
    """A checkpoint or Fisher file is unreadable, corrupt, refused (pickle) or contains bad values."""


class IncompatibleModelsError(ValueError):
    """The models (or a model and its Fisher) do not share names, shapes, dtypes or architecture."""
