#!/usr/bin/env python
"""Merge-engine benchmark: stream-merge 4 synthetic sharded bf16 checkpoints with `fisher` and `ties`.

Reports per method: wall time, effective throughput (bytes of inputs read / wall) next to the page-cache read
speed of the same files measured in the same run, and the merging process's peak RSS (target <= 1.5 GB,
independent of model size). Each merge runs in its own child process so its peak RSS is its own.

    python bench/engine.py --quick            # ~100M parameters per model (~2.6 GB of inputs incl. Fishers)
    python bench/engine.py --params 1e9       # ~1B parameters per model (~26 GB of inputs: mind the disk)

Data goes to --dir (default: a temporary directory under /tmp) and is removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pymerge.io.safetensors_file import SafetensorsStreamWriter  # noqa: E402
from pymerge.io.writer import plan_shards  # noqa: E402


def model_shapes(n_params: float):
    """A decoder-like layout (embedding, per layer 4 d x d attention + 2 d x 4d MLP + norms)."""
    d = 768 if n_params < 3e8 else 1024 if n_params < 6e8 else 2048
    vocab = 32000
    per_layer = 12 * d * d + 4 * d
    layers = max(1, round((n_params - vocab * d) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (d, d)
        shapes[p + "mlp.up_proj.weight"] = (4 * d, d)
        shapes[p + "mlp.down_proj.weight"] = (d, 4 * d)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "input_layernorm.bias"] = (d,)
        shapes[p + "post_attention_layernorm.bias"] = (d,)
    shapes["model.norm.weight"] = (d,)
    return shapes, d, layers


def fill(shape, dtype, seed, kind):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    if kind == "fisher":
        t = t.square_()
    elif kind == "finetune":
        t = t.mul_(0.02)
    return t.to(dtype)


def write_sharded(directory: Path, shapes, dtype, seed, shard_bytes, kind, base=None):
    directory.mkdir(parents=True)
    entries = [(k, dtype, s) for k, s in shapes.items()]
    shards = plan_shards(entries, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, (shard, fname) in enumerate(zip(shards, names)):
        w = SafetensorsStreamWriter(directory / fname, shard, metadata={"format": "pt"})
        for j, (k, dt, s) in enumerate(shard):
            t = fill(s, dt, seed * 100003 + i * 1009 + j, kind)
            if base is not None:  # fine-tune = base + small delta (regenerated, not stored in memory)
                t = (fill(s, torch.float32, 7 * 100003 + i * 1009 + j, "base") + t.float()).to(dt)
            w.write(k, t)
        w.close()
    wm = {e[0]: names[i] for i, s in enumerate(shards) for e in s}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["BenchModel"]}))


def write_fisher(path: Path, shapes, seed):
    entries = [(k, torch.float32, s) for k, s in shapes.items()]
    meta = {"pymerge_fisher": "1", "mode": "exact", "num_examples": "1", "structure": "bench", "weights": "bench"}
    w = SafetensorsStreamWriter(path, entries, metadata=meta)
    for j, (k, dt, s) in enumerate(entries):
        w.write(k, fill(s, dt, seed * 7919 + j, "fisher"))
    w.close()


def files_under(paths):
    out = []
    for p in paths:
        p = Path(p)
        out += sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    return out


def read_speed(files):
    """GB/s of reading the files from the page cache (second pass; the first one warms the cache)."""
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    total, best = 0, None
    for _ in range(2):
        t0 = time.perf_counter()
        total = 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(view)
                    if not n:
                        break
                    total += n
        best = time.perf_counter() - t0
    return total / best / 1e9, total


def child(config_json: str, out: str) -> None:
    import pymerge

    cfg = json.loads(config_json)
    merge = pymerge.merge  # resolves pymerge's lazy import of the engine before the clock starts
    t0 = time.perf_counter()
    merge(cfg, out, progress=False)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": rss}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~100M parameters per model")
    ap.add_argument("--params", type=float, default=1e9, help="parameters per model (default 1e9)")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to write the synthetic checkpoints")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--reuse", action="store_true",
                    help="use the data a previous --keep run left in --dir (to compare builds on the same files)")
    ap.add_argument("--repeats", type=int, default=1, help="merges per method (the fastest is reported)")
    ap.add_argument("--methods", default="fisher,ties")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    n = 1e8 if args.quick else args.params
    shapes, d, layers = model_shapes(n)
    n_real = sum(torch.Size(s).numel() for s in shapes.values())
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pymerge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    need = n_real * (2 * (args.models + 1) + 4 * args.models + 2)
    free = shutil.disk_usage(root).free
    print(f"models: {args.models} x {n_real / 1e6:.0f}M parameters (d={d}, {layers} layers), bf16, "
          f"needs ~{need / 1e9:.1f} GB in {root} ({free / 1e9:.0f} GB free)")
    if need > 0.8 * free:
        sys.exit("not enough free disk space for this size; use --quick or a smaller --params")
    shard = 500 * 10**6
    try:
        t0 = time.perf_counter()
        need_base = any(m != "fisher" for m in args.methods.split(","))  # task-vector methods need the base
        if args.reuse and (root / "ft0").exists():
            print(f"reusing the inputs in {root}")
        else:
            if need_base:
                write_sharded(root / "base", shapes, torch.bfloat16, 7, shard, "base")
            for i in range(args.models):
                write_sharded(root / f"ft{i}", shapes, torch.bfloat16, 11 + i, shard, "finetune",
                              base=need_base or None)
                write_fisher(root / f"ft{i}.fisher.safetensors", shapes, 101 + i)
            print(f"generated inputs in {time.perf_counter() - t0:.0f} s")
        results = {}
        for method in args.methods.split(","):
            models = []
            for i in range(args.models):
                p = {"fisher": str(root / f"ft{i}.fisher.safetensors")} if method == "fisher" else {}
                models.append({"model": str(root / f"ft{i}"), "name": f"ft{i}", "parameters": p})
            cfg = {"merge_method": method, "models": models, "max_shard_size": "1GB"}
            inputs = [root / f"ft{i}" for i in range(args.models)]
            if method == "fisher":
                inputs += [root / f"ft{i}.fisher.safetensors" for i in range(args.models)]
            else:
                cfg["base_model"] = str(root / "base")
                cfg["parameters"] = {"density": 0.2, "lambda": 1.0}
                inputs.append(root / "base")
            files = files_under(inputs)
            cache_gbs, in_bytes = read_speed(files)
            out = root / f"out-{method}"
            res = None
            for _ in range(args.repeats):
                r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg),
                                    str(out)], capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"{method} failed:\n{r.stderr[-3000:]}")
                got = json.loads(r.stdout.strip().splitlines()[-1])
                res = got if res is None or got["wall_s"] < res["wall_s"] else res
                out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                shutil.rmtree(out)
            eff = in_bytes / res["wall_s"] / 1e9
            results[method] = dict(res, input_gb=in_bytes / 1e9, output_gb=out_bytes / 1e9, effective_gbs=eff,
                                   page_cache_gbs=cache_gbs)
            print(f"{method:7s} wall {res['wall_s']:7.1f} s | read {in_bytes / 1e9:6.2f} GB, wrote "
                  f"{out_bytes / 1e9:5.2f} GB | effective {eff:5.2f} GB/s vs page-cache read {cache_gbs:5.2f} GB/s "
                  f"({eff / cache_gbs:.0%}) | peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB")
        print(json.dumps({"params_per_model": n_real, "models": args.models, "results": results}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
