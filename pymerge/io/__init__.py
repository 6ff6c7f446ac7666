"""Model I/O for the merge engine: lazy tensor sources, an atomic sharded safetensors writer, task heads."""
from pymerge.io.errors import CheckpointError, IncompatibleModelsError  # noqa: F401
from pymerge.io.reader import CheckpointDir, StateDictSource, TensorSource, open_fisher, open_source  # noqa: F401
from pymerge.io.writer import OutputDirectory, parse_size  # noqa: F401
from pymerge.io.heads import load_with_head  # noqa: F401
