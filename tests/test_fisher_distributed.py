"""Under torch.distributed (gloo, 2 CPU processes) the estimators shard batches and all-reduce: the same Fisher,
Gram and K-FAC statistics as one process (one spawn for every kind: starting processes is the slow part)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fisher_models as fm
import pymerge.fisher as pf
import pymerge.stats as ps

MODES = ("exact", "sampled")
LAYER_KINDS = ("gram", "kfac")


def _batches():
    out = []
    for i, lengths in enumerate([[5, 3], [4, 6, 2], [6], [3, 3]]):  # 4 batches of uneven sizes
        ids, mask = fm.padded_ids(lengths, 6, seed=i)
        out.append(dict(input_ids=ids, attention_mask=mask, labels=torch.arange(len(lengths)) % 3))
    return out


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = fm.bert()
        for mode in MODES:
            fisher = pf.estimate(model, _batches(), mode=mode, num_samples=2)
            if rank == 0:
                pf.save(os.path.join(out_dir, f"{mode}.safetensors"), fisher)
        masks = ps.collect(model, _batches(), kind="masks", mode="exact")
        if rank == 0:
            ps.save(os.path.join(out_dir, "masks.safetensors"), masks)
        for kind in LAYER_KINDS:  # GPT-2: Conv1D layers, padded rows masked, uneven token counts per rank
            stats = ps.collect(fm.gpt2_classifier(), _batches(), kind=kind)
            if rank == 0:
                ps.save(os.path.join(out_dir, f"{kind}.safetensors"), stats)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_one_process_fisher(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model = fm.bert()
    for mode in MODES:
        one = pf.estimate(model, _batches(), mode=mode, num_samples=2)
        two = pf.load(tmp_path / f"{mode}.safetensors")
        assert two.metadata["num_examples"] == one.metadata["num_examples"] == "8"
        for k in one.keys():
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-12)
    for kind in LAYER_KINDS:
        one = ps.collect(fm.gpt2_classifier(), _batches(), kind=kind)
        two = ps.load(tmp_path / f"{kind}.safetensors")
        assert two.metadata == one.metadata and two.layers["score"]["tokens"] == 32  # all unpadded rows
        for k in one.keys():
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-9)
    one = ps.collect(model, _batches(), kind="masks", mode="exact")
    two = ps.load(tmp_path / "masks.safetensors")
    assert two.metadata == one.metadata and one.metadata["num_examples"] == "8"
    for k in one.keys():
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-12)
