"""The model card (README.md) of a merged model: method, inputs, parameters, pymerge version, as mergekit
writes one. Built from the plan and `describe(plan)` (the same facts as pymerge_merge.json)."""
from __future__ import annotations

from typing import Any, Dict

METHOD_REFERENCES = {
    "average": "https://arxiv.org/abs/2203.05482", "linear": "https://arxiv.org/abs/2203.05482",
    "task_arithmetic": "https://arxiv.org/abs/2212.04089", "ties": "https://arxiv.org/abs/2306.01708",
    "dare": "https://arxiv.org/abs/2311.03099", "dare_ties": "https://arxiv.org/abs/2311.03099",
    "dare_linear": "https://arxiv.org/abs/2311.03099", "della": "https://arxiv.org/abs/2406.11617",
    "della_linear": "https://arxiv.org/abs/2406.11617", "breadcrumbs": "https://arxiv.org/abs/2312.06795",
    "breadcrumbs_ties": "https://arxiv.org/abs/2312.06795", "model_stock": "https://arxiv.org/abs/2403.19522",
    "slerp": "https://en.wikipedia.org/wiki/Slerp", "fisher": "https://arxiv.org/abs/2111.09832",
}


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None).rstrip()


def model_card(plan, description: Dict[str, Any]) -> str:
    from pymerge import __version__

    cfg = plan.config
    method = cfg.method
    ref = METHOD_REFERENCES.get(method.name)
    bases = [description["base_model"]] if description.get("base_model") else []
    front = {"library_name": "transformers", "tags": ["merge", "pymerge", method.name]}
    if bases:
        front["base_model"] = bases
    lines = ["---", _yaml(front), "---", "", "# Merged model", "",
             f"Merged with [pymerge](https://pypi.org/project/pymerge/) {__version__} using "
             f"**{method.name}**" + (f" ([reference]({ref}))" if ref else "") + f": {method.description}.", "",
             "## Inputs", ""]
    if description.get("base_model"):
        lines.append(f"- base model: `{description['base_model']}`")
    for m in description["models"]:
        lines.append(f"- `{m['name']}`: `{m['model']}`")
    if cfg.slices:
        lines += ["", "Layer slices (output layers in this order):", "", "```yaml", _yaml(
            {"slices": _plain(cfg.slices)}), "```"]
    lines += ["", "## Parameters", "", "```yaml", _yaml({k: description[k] for k in (
        "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source", "heads") if k in description}),
        "```", ""]
    per_model = {m["name"]: m["parameters"] for m in description["models"] if m["parameters"]}
    if per_model:
        lines += ["Per-model parameters:", "", "```yaml", _yaml(per_model), "```", ""]
    s = description["summary"]
    lines += ["## Tensors", "", ", ".join(f"{n} {k}" for k, n in sorted(s["tensors"].items())) + ".", "",
              "The full record of this merge is `pymerge_merge.json`.", ""]
    return "\n".join(lines)


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
