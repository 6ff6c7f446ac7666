"""Loading a merged body together with one task's head (written by `heads: keep` to heads/TASK.*)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def load_with_head(out_dir: Union[str, os.PathLike], task: str, model_class=None, **kwargs):
    """The merged model with task `task`'s head: its config (num_labels ...) and head weights from heads/.

    model_class defaults to transformers' AutoModelForSequenceClassification.
    """
    import json

    from safetensors.torch import load_file

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
    config = None
    if config_file.is_file():
        config = AutoConfig.for_model(**json.loads(config_file.read_text()))
    model = model_class.from_pretrained(out, config=config, ignore_mismatched_sizes=True, **kwargs)
    head = load_file(str(weights))
    missing = [k for k in head if k not in model.state_dict()]
    if missing:
        raise ValueError(f"{weights}: tensors {missing[:5]} are not parameters of {type(model).__name__}")
    model.load_state_dict(head, strict=False)
    return model
