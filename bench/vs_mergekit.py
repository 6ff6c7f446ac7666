"""pymerge side by side with mergekit on the same generated models (`make bench-mergekit`; not part of make test).

1. Installs mergekit (pinned, MERGEKIT_VERSION) into its own virtual environment build/mergekit-venv, with this
   environment's torch version installed first and pinned as a constraint (so no other torch build is pulled).
2. Equality: tiny Llama-style models (1 base + 3 fine-tuned, fp32), merged by both tools with the same
   parameters; prints the max abs difference per method over all tensors.
3. Speed / memory: Llama-shaped random bf16 checkpoints of --params parameters (1 base + 3 fine-tuned, sharded
   safetensors), merged by both tools, alternating (pymerge, mergekit, pymerge, ...); wall time and the peak
   RSS of each merging process.

Run: python bench/vs_mergekit.py [--params 1.1e9] [--rounds 1] [--methods task_arithmetic ties] [--skip-large]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_VERSION = "0.1.5"
VENV = ROOT / "build" / "mergekit-venv"
WORK = ROOT / "build" / "vs-mergekit"

# Runs a command and prints its exit code and peak RSS (the child's ru_maxrss) as JSON.
RSS_WRAPPER = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(json.dumps({'rc': r.returncode, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def sh(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def setup_mergekit():
    import torch

    exe = VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    torch_version = torch.__version__.split("+")[0]
    sh([sys.executable, "-m", "venv", VENV])
    pip = [VENV / "bin" / "python", "-m", "pip", "install", "-q"]
    sh(pip + [f"torch=={torch_version}"])
    freeze = subprocess.run([VENV / "bin" / "python", "-m", "pip", "freeze"], check=True, capture_output=True, text=True)
    constraints = VENV / "constraints.txt"
    constraints.write_text("".join(l + "\n" for l in freeze.stdout.splitlines() if l.lower().startswith("torch")))
    sh(pip + [f"mergekit=={MERGEKIT_VERSION}", "-c", constraints])
    return exe


# ---- models -------------------------------------------------------------------------------------
def llama_config(size):
    from transformers import LlamaConfig

    if size == "tiny":
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    # TinyLlama-1.1B shapes (q, o; k, v with 4 KV heads; MLP; norms), layers scaled to the parameter count
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048
    layers = max(1, round((size - 2 * 32000 * 2048) / per_layer))
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def write_model(path: Path, config, dtype, seed, base=None, scale=0.02, shard_bytes=1 << 30):
    """Random weights with config's names and shapes (no model instantiated), as sharded safetensors; a
    fine-tuned model is base + scale * noise."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] if base else None
    g = torch.Generator().manual_seed(seed)
    shard, shard_n, size, weight_map = {}, 0, 0, {}
    cache = {}

    def flush():
        nonlocal shard, shard_n, size
        if shard:
            name = f"model-{shard_n:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size, shard_n = {}, 0, shard_n + 1

    for k, shape in shapes.items():
        if base is None:
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            if k.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
        else:
            f = base_index[k]
            if f not in cache:
                cache.clear()
                cache[f] = load_file(str(base / f))
            t = (cache[f][k].float() + scale * 0.02 * torch.randn(shape, generator=g)).to(dtype)
        shard[k] = t.contiguous()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.torch_dtype = str(dtype).replace("torch.", "")
    config.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture definition by this
    config.save_pretrained(str(path))
    return path


def make_models(root: Path, size, dtype):
    cfg = llama_config(size)
    base = write_model(root / "base", cfg, dtype, seed=0)
    fts = [write_model(root / f"ft{i}", cfg, dtype, seed=i + 1, base=base) for i in range(3)]
    return base, fts


# ---- configs --------------------------------------------------------------------------------------
def configs(method, base, fts, dtype):
    """(pymerge config, mergekit config) for the same merge."""
    models = [str(p) for p in fts]
    if method == "linear":
        pm = {"merge_method": "average", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}
        mk = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
              "parameters": {"normalize": True}}
    elif method == "task_arithmetic":
        pm = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": m, "parameters": {"weight": 0.4}} for m in models], "parameters": {"lambda": 1.0}}
        mk = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": m, "parameters": {"weight": 0.4}} for m in models],
              "parameters": {"normalize": False, "lambda": 1.0}}
    elif method == "ties":
        # weight 1 + normalize: mergekit's disjoint mean, as pymerge's. density 0.5 on even-sized tensors: the
        # two trim counts (mergekit int(d n), pymerge ceil(d n)) agree.
        pm = {"merge_method": "ties", "base_model": str(base), "models": [{"model": m} for m in models],
              "parameters": {"density": 0.5, "lambda": 1.0}}
        mk = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models],
              "parameters": {"normalize": True, "lambda": 1.0}}
    elif method == "dare_linear_d1":
        # DARE's random masks come from different generators in the two tools, so only density 1 (nothing
        # dropped) is comparable: it must equal task arithmetic in both.
        pm = {"merge_method": "dare", "base_model": str(base),
              "models": [{"model": m, "parameters": {"weight": 0.4}} for m in models],
              "parameters": {"p": 0.0, "over": "task_arithmetic"}}
        mk = {"merge_method": "dare_linear", "base_model": str(base),
              "models": [{"model": m, "parameters": {"weight": 0.4, "density": 1.0}} for m in models],
              "parameters": {"normalize": False}}
    elif method in MERGEKIT_AS_IS:
        # mergekit's own YAML, given to both tools unchanged (pymerge accepts it as it is)
        mk = MERGEKIT_AS_IS[method](str(base), models)
        pm = json.loads(json.dumps(mk))
        if method == "ties_odd_density":
            pm["parameters"]["trim_count"] = "floor"  # mergekit keeps int(d n); pymerge's default is ceil
    else:
        raise ValueError(method)
    name = str(dtype).replace("torch.", "")
    pm["dtype"] = name
    mk["dtype"] = name
    return pm, mk


# Methods compared with one mergekit config given to both tools (mergekit's YAML accepted as it is).
MERGEKIT_AS_IS = {
    "slerp": lambda base, m: {
        "merge_method": "slerp", "base_model": m[0], "models": [{"model": m[0]}, {"model": m[1]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "model_stock": lambda base, m: {
        "merge_method": "model_stock", "base_model": base, "models": [{"model": x} for x in m]},
    "breadcrumbs": lambda base, m: {
        "merge_method": "breadcrumbs", "base_model": base,
        "models": [{"model": x, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}} for x in m]},
    "breadcrumbs_ties": lambda base, m: {
        "merge_method": "breadcrumbs_ties", "base_model": base,
        "models": [{"model": x, "parameters": {"weight": 1.0, "density": 0.7, "gamma": 0.05}} for x in m]},
    "ties_odd_density": lambda base, m: {
        "merge_method": "ties", "base_model": base,
        "models": [{"model": x, "parameters": {"weight": w, "density": 0.3}} for x, w in zip(m, (1.0, 0.5, 0.7))],
        "parameters": {"normalize": True}},
    "passthrough_stack": lambda base, m: {
        "merge_method": "passthrough", "slices": [
            {"sources": [{"model": m[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": m[1], "layer_range": [1, 2]}]}]},
}


def run_tool(tool, cfg, out: Path, mergekit_exe):
    import yaml

    if out.exists():
        shutil.rmtree(out)
    cfg_path = out.parent / f"{out.name}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    if tool == "pymerge":
        cmd = [sys.executable, "-m", "pymerge", "merge", str(cfg_path), "-o", str(out), "--no-progress"]
    else:
        cmd = [str(mergekit_exe), str(cfg_path), str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
    info = json.loads(last) if last.startswith("{") else {"rc": r.returncode, "maxrss_kb": 0}
    if info.get("rc") != 0:
        print(f"  {tool} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}", flush=True)
    return wall, info.get("maxrss_kb", 0) / 2**20, info.get("rc")


def load_all(path: Path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def equality(mergekit_exe, methods):
    import torch

    root = WORK / "tiny"
    base, fts = make_models(root, "tiny", torch.float32)
    print("\n== equality on tiny Llama models (fp32, 1 base + 3 fine-tuned) ==", flush=True)
    rows = []
    for method in methods:
        pm_cfg, mk_cfg = configs(method, base, fts, torch.float32)
        a, b = root / f"out-pymerge-{method}", root / f"out-mergekit-{method}"
        ra, rb = run_tool("pymerge", pm_cfg, a, mergekit_exe), run_tool("mergekit", mk_cfg, b, mergekit_exe)
        if ra[2] != 0 or rb[2] != 0:
            rows.append((method, "failed", ""))
            continue
        ta, tb = load_all(a), load_all(b)
        common = sorted(set(ta) & set(tb))
        diff = max((ta[k].float() - tb[k].float()).abs().max().item() for k in common)
        scale = max(tb[k].float().abs().max().item() for k in common)
        only = sorted(set(ta) ^ set(tb))
        rows.append((method, f"{diff:.3g}", f"{len(common)} tensors, max |value| {scale:.3g}"
                     + (f", {len(only)} only in one output" if only else "")))
        print(f"  {method:16s} max |pymerge - mergekit| = {diff:.3g}  ({rows[-1][2]})", flush=True)
    return rows


def speed(mergekit_exe, params, methods, rounds):
    import torch

    root = WORK / f"large-{params / 1e6:.0f}M"  # no "+" in the path: mergekit reads "a+b" as model+LoRA
    t0 = time.perf_counter()
    base, fts = make_models(root, params, torch.bfloat16)
    n = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    print(f"\n== speed / memory: Llama-shaped bf16, {params:.2g} parameters ({n} layers) x (1 base + 3 fine-tuned); "
          f"models written in {time.perf_counter() - t0:.0f} s ==", flush=True)
    results = []
    for method in methods:
        pm_cfg, mk_cfg = configs(method, base, fts, torch.bfloat16)
        for r in range(rounds):
            for tool, cfg in (("pymerge", pm_cfg), ("mergekit", mk_cfg)):
                out = root / f"out-{tool}"
                wall, rss, rc = run_tool(tool, cfg, out, mergekit_exe)
                results.append((method, tool, r, wall, rss, rc))
                print(f"  {method:16s} {tool:9s} round {r}: wall {wall:7.1f} s  peak RSS {rss:5.2f} GiB  rc {rc}",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.1e9, help="parameters per large model (default 1.1e9)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per method on the large models")
    ap.add_argument("--methods", nargs="*", default=["task_arithmetic", "ties"], help="methods timed on the large models")
    ap.add_argument("--skip-large", action="store_true", help="only the equality check on tiny models")
    ap.add_argument("--setup-only", action="store_true", help="only install mergekit into build/mergekit-venv")
    args = ap.parse_args(argv)
    exe = setup_mergekit()
    if args.setup_only:
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"mergekit {MERGEKIT_VERSION} ({exe}); machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
          flush=True)
    equality(exe, ["linear", "task_arithmetic", "ties", "dare_linear_d1", *MERGEKIT_AS_IS])
    if not args.skip_large:
        speed(exe, int(args.params), args.methods, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
