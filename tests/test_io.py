"""pymerge.io: lazy safetensors reading, the streaming writer, atomic output directories, sources."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pymerge.io import CheckpointDir, CheckpointError, OutputDirectory, StateDictSource, open_fisher, parse_size
from pymerge.io.safetensors_file import SafetensorsFile, SafetensorsStreamWriter
from pymerge.io.writer import plan_shards


class Unpicklable:
    """A class weights_only unpickling refuses."""


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(5, 3, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_reader_matches_safetensors_library(tmp_path):
    ts = _tensors()
    save_file(ts, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert sorted(f.keys()) == sorted(ts)
    for k, v in ts.items():
        assert f.dtype(k) == v.dtype and f.shape(k) == tuple(v.shape)
        assert torch.equal(f.read(k), v)
    assert torch.equal(f.read("a", rows=(1, 4)), ts["a"][1:4])
    assert torch.equal(f.read("c", rows=(1, 2)), ts["c"][1:2])


def test_stream_writer_round_trip_whole_and_chunked(tmp_path):
    ts = _tensors()
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]
    w = SafetensorsStreamWriter(tmp_path / "out.safetensors", entries, metadata={"format": "pt", "x": "1"})
    for k, v in ts.items():
        if k == "a":  # rows in three chunks
            for s in (slice(0, 2), slice(2, 3), slice(3, 5)):
                w.write(k, v[s])
        else:
            w.write(k, v)
    w.close()
    got = load_file(str(tmp_path / "out.safetensors"))
    assert set(got) == set(ts)
    for k in ts:
        assert torch.equal(got[k], ts[k]) and got[k].dtype == ts[k].dtype
    assert SafetensorsFile(tmp_path / "out.safetensors").metadata == {"format": "pt", "x": "1"}


def test_stream_writer_rejects_wrong_order_shape_and_early_close(tmp_path):
    ts = _tensors()
    entries = [("a", torch.float32, (5, 3)), ("b", torch.bfloat16, (7,))]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        w.write("b", ts["b"])
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        w.write("a", torch.zeros(5, 4))
    w.write("a", ts["a"])
    with pytest.raises(RuntimeError, match="closed after 1 of 2"):
        w.close()


def test_truncated_and_corrupt_files_are_reported(tmp_path):
    save_file(_tensors(), str(tmp_path / "ok.safetensors"))
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-10])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    for name in ("trunc", "garbage"):
        with pytest.raises(CheckpointError, match=f"{name}.safetensors: not a valid safetensors file"):
            SafetensorsFile(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        SafetensorsFile(tmp_path / "nope.safetensors")


def test_checkpoint_dir_sharded_single_and_missing_shard(tmp_path):
    ts = _tensors()
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({k: ts[k] for k in ("a", "b")}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: ts[k] for k in ("c", "scalar")}, str(d / "model-00002-of-00002.safetensors"))
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors", "scalar": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    src = CheckpointDir(d)
    assert sorted(src.keys()) == ["a", "b", "c", "scalar"]
    assert torch.equal(src.read("c"), ts["c"])
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        CheckpointDir(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model weights found"):
        CheckpointDir(empty)
    with pytest.raises(FileNotFoundError, match="model not found"):
        CheckpointDir(tmp_path / "absent")
    (tmp_path / "bad_cfg").mkdir()
    (tmp_path / "bad_cfg" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="unreadable model config"):
        CheckpointDir(tmp_path / "bad_cfg")


def test_pickle_checkpoints_refused_unless_allowed(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    ts = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    torch.save(ts, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*allow-pickle"):
        CheckpointDir(d)
    src = CheckpointDir(d, allow_pickle=True)
    assert torch.equal(src.read("w"), ts["w"]) and torch.equal(src.read("w", rows=(1, 3)), ts["w"][1:3])
    # weights_only=True: arbitrary objects are never unpickled, even when pickles are allowed
    torch.save({"w": torch.randn(2), "obj": Unpicklable()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        CheckpointDir(d, allow_pickle=True)
    torch.save({"w": torch.randn(2), "n": 3}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="mapping of parameter names to tensors"):
        CheckpointDir(d, allow_pickle=True)


def test_state_dict_source_does_not_copy_or_alias_files():
    sd = {"w": torch.randn(4, 2)}
    src = StateDictSource(sd, label="mem")
    assert src.read("w") is not None and torch.equal(src.read("w", rows=(0, 2)), sd["w"][:2])
    assert src.owned is False  # the engine must not modify these in place
    module = torch.nn.Linear(3, 2)
    assert sorted(StateDictSource(module).keys()) == ["bias", "weight"]
    with pytest.raises(CheckpointError, match="not a tensor"):
        StateDictSource({"w": 3}, label="bad")


def test_open_fisher_checks_metadata_and_dtype(tmp_path):
    from pymerge.fisher import store

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="no pymerge Fisher metadata"):
        open_fisher(tmp_path / "plain.safetensors")
    meta = {"pymerge_fisher": "1", "mode": "exact", "num_examples": "1", "structure": "x", "weights": "y"}
    store.save(tmp_path / "f.safetensors", store.Fisher({"w": torch.ones(2)}, meta))
    assert open_fisher(tmp_path / "f.safetensors").metadata["mode"] == "exact"
    with pytest.raises(FileNotFoundError, match="Fisher file not found"):
        open_fisher(tmp_path / "nope.safetensors")


def test_parse_size_and_plan_shards():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1KiB") == 1024 and parse_size(77) == 77
    for bad in ("lots", "-1MB", 0, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)
    entries = [("a", torch.float32, (10,)), ("b", torch.float32, (10,)), ("c", torch.float32, (100,))]
    shards = plan_shards(entries, 80)
    assert [[e[0] for e in s] for s in shards] == [["a", "b"], ["c"]]


def test_output_directory_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputDirectory(out) as od:
            od.write_json("x.json", {"a": 1})
            raise RuntimeError("boom")
    assert not out.exists() and os.listdir(tmp_path) == []
    od = OutputDirectory(out)
    od.write_json("x.json", {"a": 1})
    od.commit()
    assert json.loads((out / "x.json").read_text()) == {"a": 1}
    with pytest.raises(FileExistsError, match="--force"):
        OutputDirectory(out)
    od = OutputDirectory(out, force=True)
    od.write_json("y.json", {})
    od.commit()
    assert sorted(os.listdir(out)) == ["y.json"] and sorted(os.listdir(tmp_path)) == ["out"]


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=6),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int32]),
                       min_size=6, max_size=6),
       shard=st.integers(1, 200), chunk=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_sharded_checkpoint_round_trip_property(tmp_path_factory, shapes, dtypes, shard, chunk, seed):
    """Any tensors, any shard size, written whole or in row chunks, read back equal (library and pymerge)."""
    g = torch.Generator().manual_seed(seed)
    ts = {f"t{i}": (100 * torch.randn(s, generator=g)).to(dtypes[i]) for i, s in enumerate(shapes)}
    out = tmp_path_factory.mktemp("ckpt") / "out"
    with OutputDirectory(out) as od:
        ckpt = od.checkpoint([(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], shard)
        for k, v in ts.items():
            if v.dim() and v.shape[0] > 1:
                for s in range(0, v.shape[0], chunk):
                    ckpt.write(k, v[s:s + chunk])
            else:
                ckpt.write(k, v)
        od.commit()
    src = CheckpointDir(out)
    assert sorted(src.keys()) == sorted(ts)
    import engine_models

    lib = engine_models.load_dir(out)
    for k, v in ts.items():
        assert torch.equal(src.read(k), v) and torch.equal(lib[k], v) and lib[k].dtype == v.dtype
