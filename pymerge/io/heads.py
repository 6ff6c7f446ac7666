"""Loading a merged body together with one task's head (written by `heads: keep` to heads/TASK.*)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union


def load_with_head(out_dir: Union[str, os.PathLike], task: str, model_class=None):
    """The merged model with task `task`'s head and config (num_labels ...), built from the merged directory.

    model_class defaults to transformers' AutoModelForSequenceClassification.
    """
    from pymerge.io.reader import CheckpointDir
    from pymerge.io.safetensors_file import SafetensorsFile
    from pymerge.io.writer import safe_task_name

    out = Path(out_dir)
    stem = out / "heads" / safe_task_name(task)
    weights = stem.with_suffix(".safetensors")
    if not weights.is_file():
        have = sorted(p.stem for p in (out / "heads").glob("*.safetensors")) if (out / "heads").is_dir() else []
        raise FileNotFoundError(f"{weights}: no head for task {task!r} (heads present: {have})")
    if model_class is None:
        from transformers import AutoModelForSequenceClassification as model_class
    from transformers import AutoConfig

    config_file = stem.with_suffix(".config.json")
    config = AutoConfig.for_model(**json.loads(config_file.read_text())) if config_file.is_file() \
        else AutoConfig.from_pretrained(out)
    model = model_class.from_config(config)
    body = CheckpointDir(out)
    head = SafetensorsFile(weights)
    state = {k: body.read(k) for k in body.keys() if k not in head.entries}
    state.update({k: head.read(k) for k in head.keys()})
    result = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(f"{out}: merged weights + head of {task!r} do not fit {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()
