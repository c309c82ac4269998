"""Checkpoint files: safetensors read/write, sharding, atomic writes and the strict loader.

Every bad input is built from a golden checkpoint copied into tmp_path and then broken;
each error test checks the exception TYPE and that the message names the culprit
(the file, the tensor key, the shapes or the dtype).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import DATA, GOLDEN
from gpt2_helpers import count_gpt2_params
from refjax.params import gpt2 as gpt2_params
from refjax.params.checkpoint import load_checkpoint, save_checkpoint
from refjax.params.gpt2 import parse_gpt2_config
from refjax.params.io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    atomic_write,
    count_params,
    read_checkpoint_tensors,
    read_safetensors,
    tree_paths,
    write_checkpoint_tensors,
    write_safetensors,
)

LM = os.path.join(GOLDEN, "gpt2", "lm")
MODEL = os.path.join(GOLDEN, "gpt2", "model")
GOLDEN_CASES = sorted(os.listdir(os.path.join(GOLDEN, "gpt2")))


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def golden_tensors(case_dir: str = LM) -> dict[str, np.ndarray]:
    """The golden weights as plain (writable, in-memory) numpy arrays."""
    tensors, _ = read_safetensors(os.path.join(case_dir, SINGLE_FILE))
    return {k: np.array(v) for k, v in tensors.items()}


def copy_case(tmp_path, case_dir: str = LM, name: str = "ckpt") -> str:
    """config.json + model.safetensors of a golden case, copied into tmp_path/name."""
    out = tmp_path / name
    out.mkdir()
    for file in ("config.json", SINGLE_FILE):
        shutil.copy(os.path.join(case_dir, file), out / file)
    return str(out)


def make_checkpoint(tmp_path, tensors, case_dir: str = LM, name: str = "ckpt", max_shard_bytes=None) -> str:
    """A checkpoint dir with the golden config of `case_dir` and the given tensors."""
    out = tmp_path / name
    out.mkdir()
    shutil.copy(os.path.join(case_dir, "config.json"), out / "config.json")
    write_checkpoint_tensors(str(out), tensors, max_shard_bytes=max_shard_bytes)
    return str(out)


def leaves(params) -> dict[str, np.ndarray]:
    return {path: np.asarray(leaf) for path, leaf in tree_paths(params)}


def assert_same_params(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for path in la:
        assert la[path].dtype == lb[path].dtype, path
        assert la[path].shape == lb[path].shape, path
        np.testing.assert_array_equal(la[path], lb[path], err_msg=path)


def sharded_copy(tmp_path, name: str = "sharded", max_shard_bytes: int = 4000) -> tuple[str, dict]:
    """The golden lm checkpoint written as shards + index; returns (dir, index dict)."""
    out = make_checkpoint(tmp_path, golden_tensors(), name=name, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(out, INDEX_FILE)) as f:
        index = json.load(f)
    return out, index


def write_index(checkpoint_dir: str, content) -> str:
    path = os.path.join(checkpoint_dir, INDEX_FILE)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


# --------------------------------------------------------------------------------------
# happy paths
# --------------------------------------------------------------------------------------


def test_load_golden_lm():
    ck = load_checkpoint(LM)
    raw = json.load(open(os.path.join(LM, "config.json")))
    assert ck.family == "gpt2"
    assert ck.raw_config == raw
    c = ck.config
    assert (c.architecture, c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (
        "GPT2LMHeadModel", 320, 48, 16, 2, 2)
    p = ck.params
    assert p.lm_head is None  # tied
    assert p.transformer.wte.table.shape == (320, 16)
    assert p.transformer.wpe.table.shape == (48, 16)
    assert p.transformer.h.attn.c_attn.kernel.shape == (2, 16, 48)
    assert p.transformer.h.mlp.c_fc.kernel.shape == (2, 16, 64)
    assert p.transformer.h.mlp.c_proj.kernel.shape == (2, 64, 16)
    assert p.transformer.ln_f.scale.shape == (16,)
    assert all(np.asarray(leaf).dtype == np.float32 for _, leaf in tree_paths(p))
    t = golden_tensors()
    np.testing.assert_array_equal(p.transformer.wte.table, t["transformer.wte.weight"])
    np.testing.assert_array_equal(p.transformer.h.attn.c_attn.kernel[1], t["transformer.h.1.attn.c_attn.weight"])
    np.testing.assert_array_equal(p.transformer.h.ln_2.scale[0], t["transformer.h.0.ln_2.weight"])
    # every tensor of the file is used (tied: no lm_head.weight stored)
    assert count_params(p) == sum(v.size for v in t.values()) == count_gpt2_params(c)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_every_golden_checkpoint_loads(case):
    ck = load_checkpoint(os.path.join(GOLDEN, "gpt2", case))
    t = golden_tensors(os.path.join(GOLDEN, "gpt2", case))
    # exactly the stored tensors are loaded: the tree holds as many scalars as the file
    assert count_params(ck.params) == sum(v.size for v in t.values())


def test_load_dtype_casts():
    ck64 = load_checkpoint(LM, dtype=jnp.float64)
    ck32 = load_checkpoint(LM)
    for (path, a), (_, b) in zip(tree_paths(ck64.params), tree_paths(ck32.params)):
        assert a.dtype == jnp.float64, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float64))


# --------------------------------------------------------------------------------------
# safetensors round trips
# --------------------------------------------------------------------------------------

ROUND_TRIP_DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16,
                     np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_safetensors_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    values = {
        "a.weight": rng.normal(size=(3, 5)) * 50,
        "b.bias": rng.normal(size=(7,)) * 50,
        "c.stack": rng.normal(size=(2, 3, 4)) * 50,
    }
    tensors = {k: (v > 0 if dtype is np.bool_ else v).astype(dtype) for k, v in values.items()}
    tensors["d.noncontiguous"] = tensors["a.weight"].T  # written as its logical (transposed) layout
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt", "n": 3})
    back, metadata = read_safetensors(path)
    assert metadata == {"format": "pt", "n": "3"}
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == np.dtype(dtype), k
        assert back[k].shape == v.shape, k
        np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]  # no temp file left behind


def test_safetensors_round_trip_jax_arrays(tmp_path):
    tensors = {"f32": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
               "bf16": jnp.linspace(-3, 3, 8, dtype=jnp.float32).astype(jnp.bfloat16),
               "i32": jnp.arange(4, dtype=jnp.int32)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back, _ = read_safetensors(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v))


def test_safetensors_round_trip_empty_tensor(tmp_path):
    tensors = {"empty": np.zeros((0, 3), np.float32), "after": np.arange(4, dtype=np.float32)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back, _ = read_safetensors(tmp_path / "x.safetensors")
    assert back["empty"].shape == (0, 3)
    np.testing.assert_array_equal(back["after"], tensors["after"])


def test_safetensors_round_trip_scalar(tmp_path):
    """A 0-d tensor (e.g. the `attn.masked_bias` buffer of old GPT-2 files) keeps shape ()."""
    tensors = {"scalar": np.array(3.5, np.float32), "vector": np.ones(2, np.float32)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back, _ = read_safetensors(tmp_path / "x.safetensors")
    assert back["scalar"].shape == ()  # refjax writes it as [1] (np.ascontiguousarray makes 0-d arrays 1-d)
    assert float(back["scalar"]) == 3.5


def test_write_safetensors_unsupported_dtype_names_tensor(tmp_path):
    with pytest.raises(ValueError, match=r"'z\.weight'.*complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"z.weight": np.zeros(2, np.complex64)})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bf16", "f16"])
def test_low_precision_checkpoint_loads(tmp_path, dtype):
    """A golden model converted with our writer: kept in its dtype, or cast by dtype=."""
    low = {k: v.astype(dtype) for k, v in golden_tensors().items()}
    ckpt = make_checkpoint(tmp_path, low)
    ck = load_checkpoint(ckpt)
    assert ck.params.transformer.wte.table.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(ck.params.transformer.wte.table), low["transformer.wte.weight"])
    ck32 = load_checkpoint(ckpt, dtype=jnp.float32)
    for path, leaf in tree_paths(ck32.params):
        assert leaf.dtype == jnp.float32, path
    np.testing.assert_array_equal(np.asarray(ck32.params.transformer.h.attn.c_attn.kernel[0]),
                                  low["transformer.h.0.attn.c_attn.weight"].astype(np.float32))


# --------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------


def test_atomic_write_success(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_write(target) as f:
        f.write(b"hello")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write(b"half written")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # neither the target nor a temp file


def test_atomic_write_exception_keeps_existing_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"original")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write(b"new content")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_text_mode_replaces(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_write(target, "w") as f:
        f.write('{"a": 1}')
    assert json.loads(target.read_text()) == {"a": 1}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077, 0o027])
def test_atomic_write_gives_the_mode_a_plain_write_would(tmp_path, umask):
    """0o666 & ~umask for a new file (mkstemp alone makes 0600), whatever the umask; compared
    with what `open(path, "w")` gives under the same umask."""
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
        write_safetensors(tmp_path / "t.safetensors", {"a": np.zeros(2, np.float32)})
        with open(tmp_path / "plain.bin", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    plain = (tmp_path / "plain.bin").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == plain
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == plain


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o640


def test_atomic_write_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        with atomic_write(missing / "out.bin") as f:
            f.write(b"x")


def test_write_safetensors_failure_keeps_existing_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_safetensors(path, {"a": np.ones(3, np.float32), "b": np.ones(3, np.complex128)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


# --------------------------------------------------------------------------------------
# sharding and save/load
# --------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads_identically(tmp_path):
    tensors = golden_tensors()
    out, index = sharded_copy(tmp_path)
    files = sorted(os.listdir(out))
    shards = [f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
    assert len(shards) > 2
    assert SINGLE_FILE not in files and INDEX_FILE in files
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # each shard respects the limit unless it holds one big tensor
        shard_tensors, metadata = read_safetensors(os.path.join(out, shard))
        assert metadata == {"format": "pt"}
        assert len(shard_tensors) == 1 or sum(v.nbytes for v in shard_tensors.values()) <= 4000
    back = read_checkpoint_tensors(out)
    assert back.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])
    assert_same_params(load_checkpoint(out).params, load_checkpoint(LM).params)


def test_write_checkpoint_tensors_returns_files(tmp_path):
    tensors = golden_tensors()
    (tmp_path / "one").mkdir()
    assert write_checkpoint_tensors(tmp_path / "one", tensors) == [SINGLE_FILE]
    assert write_checkpoint_tensors(tmp_path / "one", tensors, max_shard_bytes=10**9) == [SINGLE_FILE]
    (tmp_path / "many").mkdir()
    files = write_checkpoint_tensors(tmp_path / "many", tensors, max_shard_bytes=4000)
    assert files[-1] == INDEX_FILE
    assert sorted(files) == sorted(os.listdir(tmp_path / "many"))


@pytest.mark.parametrize("case", ["lm", "model", "lm-untied", "double-heads", "seqcls-single", "tokcls", "qa"])
@pytest.mark.parametrize("max_shard_bytes", [None, 3000])
def test_save_load_round_trip_exact(tmp_path, case, max_shard_bytes):
    src = os.path.join(GOLDEN, "gpt2", case)
    ck = load_checkpoint(src)
    out = tmp_path / "saved"
    save_checkpoint(out, ck, max_shard_bytes=max_shard_bytes)
    back = load_checkpoint(out)
    assert back.config == ck.config
    assert back.raw_config == ck.raw_config
    assert_same_params(back.params, ck.params)
    # same HF tensors (names, shapes, bytes) as the original file
    original, saved = golden_tensors(src), read_checkpoint_tensors(out)
    assert saved.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(saved[k], original[k], err_msg=k)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# --------------------------------------------------------------------------------------
# directory / file errors
# --------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*does not exist"):
        load_checkpoint(missing)


def test_file_instead_of_directory(tmp_path):
    file = tmp_path / "model.safetensors"
    shutil.copy(os.path.join(LM, SINGLE_FILE), file)
    with pytest.raises(FileNotFoundError, match=re.escape(str(file)) + ".*not a directory"):
        load_checkpoint(file)


def test_missing_config_json(tmp_path):
    ckpt = copy_case(tmp_path)
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json.*" + re.escape(ckpt)):
        load_checkpoint(ckpt)


def test_missing_weights(tmp_path):
    ckpt = copy_case(tmp_path)
    os.remove(os.path.join(ckpt, SINGLE_FILE))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin.*" + re.escape(ckpt)):
        load_checkpoint(ckpt)


def test_bin_only_directory_is_read_with_torch(tmp_path):
    """A .bin is read (tests/test_bin.py has the rest); one that is not a torch file names itself."""
    pytest.importorskip("torch", reason="reading .bin needs torch")
    ckpt = copy_case(tmp_path)
    os.remove(os.path.join(ckpt, SINGLE_FILE))
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"not really a torch file")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)"):
        load_checkpoint(ckpt)


def _broken_weights(tmp_path, content: bytes) -> str:
    ckpt = copy_case(tmp_path)
    with open(os.path.join(ckpt, SINGLE_FILE), "wb") as f:
        f.write(content)
    return ckpt


def _golden_bytes() -> bytes:
    with open(os.path.join(LM, SINGLE_FILE), "rb") as f:
        return f.read()


@pytest.mark.parametrize("name, make", [
    ("zero-byte", lambda full: b""),
    ("shorter than the length field", lambda full: full[:5]),
    ("truncated data", lambda full: full[:-10]),
    ("truncated header", lambda full: full[:8 + int.from_bytes(full[:8], "little") // 2]),
    ("garbage header", lambda full: (16).to_bytes(8, "little") + b"this is not json" + full[24:]),
    ("header length larger than the file", lambda full: (len(full) * 4).to_bytes(8, "little") + full[8:]),
    ("header length 2**64-1", lambda full: (2**64 - 1).to_bytes(8, "little") + full[8:]),
    ("header is a JSON list", lambda full: (8).to_bytes(8, "little") + b"[]      "),
    ("random bytes", lambda full: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
])
def test_corrupt_safetensors(tmp_path, name, make):
    ckpt = _broken_weights(tmp_path, make(_golden_bytes()))
    path = os.path.join(ckpt, SINGLE_FILE)
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*not a valid safetensors file"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(path)):
        read_safetensors(path)


def test_unsupported_tensor_dtype(tmp_path):
    header = json.dumps({"x.weight": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(CheckpointError, match=r"'x\.weight'.*F8_E4M3"):
        read_safetensors(path)


def test_read_safetensors_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_safetensors(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------------------
# sharded index errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, culprit", [
    ("invalid JSON", "{not json", "JSONDecodeError"),
    ("empty file", "", "JSONDecodeError"),
    ("JSON list", "[]", "TypeError"),
    ("JSON null", "null", "TypeError"),
    ("no weight_map", {"metadata": {"total_size": 1}}, "weight_map"),
    ("weight_map is a list", {"weight_map": ["model-00001-of-00002.safetensors"]}, "weight_map"),
    ("weight_map values not strings", {"weight_map": {"transformer.wte.weight": 1}}, "weight_map"),
])
def test_invalid_index(tmp_path, name, content, culprit):
    out, _ = sharded_copy(tmp_path)
    path = write_index(out, content)
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*invalid sharded index.*" + culprit):
        load_checkpoint(out)


def test_index_not_utf8(tmp_path):
    out, _ = sharded_copy(tmp_path)
    path = os.path.join(out, INDEX_FILE)
    with open(path, "wb") as f:
        f.write(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*invalid sharded index"):
        load_checkpoint(out)


def test_index_names_missing_shard(tmp_path):
    out, index = sharded_copy(tmp_path)
    shard = index["weight_map"]["transformer.wte.weight"]
    os.remove(os.path.join(out, shard))
    with pytest.raises(FileNotFoundError, match=re.escape(INDEX_FILE) + ".*" + re.escape(repr(shard))):
        load_checkpoint(out)


def test_index_names_shard_outside_directory(tmp_path):
    out, index = sharded_copy(tmp_path)
    shutil.copy(os.path.join(out, index["weight_map"]["transformer.wte.weight"]), tmp_path / "outside.safetensors")
    index["weight_map"] = {k: "../outside.safetensors" for k in index["weight_map"]}
    write_index(out, index)
    with pytest.raises(FileNotFoundError, match=re.escape("'../outside.safetensors'")):
        load_checkpoint(out)


def test_index_maps_key_to_wrong_shard(tmp_path):
    out, index = sharded_copy(tmp_path)
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    # a key whose real shard holds other keys too, so that shard is still read
    key = next(k for k in sorted(wm) if list(wm.values()).count(wm[k]) > 1)
    right = wm[key]
    wrong = next(v for v in shards if v != right)
    wm[key] = wrong
    write_index(out, index)
    with pytest.raises(CheckpointError, match=re.escape(INDEX_FILE) + ".*" + re.escape(repr(key)) + ".*"
                       + re.escape(repr(right)) + ".*" + re.escape(repr(wrong))):
        load_checkpoint(out)


def test_index_maps_sole_key_of_a_shard_elsewhere(tmp_path):
    """The real shard is then no longer listed at all: the key and the wrong shard are named."""
    out, index = sharded_copy(tmp_path)
    wm = index["weight_map"]
    key = "transformer.wte.weight"
    assert list(wm.values()).count(wm[key]) == 1  # its own shard (the largest tensor)
    wrong = next(v for v in sorted(set(wm.values())) if v != wm[key])
    wm[key] = wrong
    write_index(out, index)
    with pytest.raises(CheckpointError, match=re.escape(repr(key)) + ".*" + re.escape(repr(wrong))):
        load_checkpoint(out)


def test_index_lists_key_no_shard_has(tmp_path):
    out, index = sharded_copy(tmp_path)
    some_shard = index["weight_map"]["transformer.ln_f.bias"]
    index["weight_map"]["transformer.h.7.ln_1.weight"] = some_shard
    write_index(out, index)
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.7\.ln_1\.weight'.*" + re.escape(repr(some_shard))):
        load_checkpoint(out)


def test_index_missing_a_key_the_model_needs(tmp_path):
    """A shard tensor the index does not list is refused (the index is authoritative)."""
    out, index = sharded_copy(tmp_path)
    del index["weight_map"]["transformer.wpe.weight"]
    write_index(out, index)
    with pytest.raises(CheckpointError, match=r"'transformer\.wpe\.weight'"):
        load_checkpoint(out)


def test_index_with_corrupt_shard(tmp_path):
    out, index = sharded_copy(tmp_path)
    shard = index["weight_map"]["transformer.wte.weight"]
    with open(os.path.join(out, shard), "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match=re.escape(shard) + ".*not a valid safetensors file"):
        load_checkpoint(out)


# --------------------------------------------------------------------------------------
# tensor <-> tree errors
# --------------------------------------------------------------------------------------


def test_missing_tensor(tmp_path):
    tensors = golden_tensors()
    del tensors["transformer.h.1.attn.c_attn.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.h\.1\.attn\.c_attn\.weight'.*\[16, 48\]"):
        load_checkpoint(make_checkpoint(tmp_path, tensors))


def test_missing_untied_lm_head(tmp_path):
    case = os.path.join(GOLDEN, "gpt2", "lm-untied")
    tensors = golden_tensors(case)
    assert load_checkpoint(case).params.lm_head is not None
    del tensors["lm_head.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'lm_head\.weight'.*\[64, 16\]"):
        load_checkpoint(make_checkpoint(tmp_path, tensors, case))


def test_unexpected_tensor(tmp_path):
    tensors = golden_tensors()
    tensors["transformer.h.0.attn.extra.weight"] = np.zeros((4, 2), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.h\.0\.attn\.extra\.weight'.*\[4, 2\]"):
        load_checkpoint(make_checkpoint(tmp_path, tensors))


def test_extra_layer_is_unexpected(tmp_path):
    tensors = golden_tensors()
    for k in [k for k in tensors if k.startswith("transformer.h.1.")]:
        tensors[k.replace("h.1.", "h.2.")] = tensors[k]
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.h\.2\."):
        load_checkpoint(make_checkpoint(tmp_path, tensors))


@pytest.mark.parametrize("key, bad_shape, good_shape", [
    ("transformer.wpe.weight", (47, 16), (48, 16)),
    ("transformer.h.0.mlp.c_fc.weight", (64, 16), (16, 64)),  # an nn.Linear-style (transposed) Conv1D weight
    ("transformer.ln_f.bias", (16, 1), (16,)),
    ("transformer.ln_f.weight", (2, 8), (16,)),  # same size, wrong shape
])
def test_misshaped_tensor(tmp_path, key, bad_shape, good_shape):
    tensors = golden_tensors()
    tensors[key] = np.zeros(bad_shape, np.float32)
    with pytest.raises(CheckpointError, match=re.escape(f"'{key}' has shape {list(bad_shape)}; expected {list(good_shape)}")):
        load_checkpoint(make_checkpoint(tmp_path, tensors))


def test_misshaped_head_tensor(tmp_path):
    """nn.Linear heads are stored [out, in]; a kernel saved [in, out] is refused, both shapes shown."""
    case = os.path.join(GOLDEN, "gpt2", "tokcls")
    tensors = golden_tensors(case)
    tensors["classifier.weight"] = np.ascontiguousarray(tensors["classifier.weight"].T)
    with pytest.raises(CheckpointError, match=r"'classifier\.weight' has shape \[16, 5\]; expected \[5, 16\]"):
        load_checkpoint(make_checkpoint(tmp_path, tensors, case))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_weight(tmp_path, dtype):
    tensors = golden_tensors()
    tensors["transformer.h.1.ln_1.bias"] = tensors["transformer.h.1.ln_1.bias"].astype(dtype)
    name = np.dtype(dtype).name
    with pytest.raises(CheckpointError, match=rf"'transformer\.h\.1\.ln_1\.bias' has dtype {name}; expected a floating"):
        load_checkpoint(make_checkpoint(tmp_path, tensors))


def test_config_error_is_raised_before_weights_are_read(tmp_path):
    """A bad config is reported as such even when the weights are also broken."""
    ckpt = _broken_weights(tmp_path, b"")
    cfg = os.path.join(ckpt, "config.json")
    raw = json.load(open(cfg))
    raw["n_head"] = 3
    json.dump(raw, open(cfg, "w"))
    with pytest.raises(ValueError, match="n_head"):
        load_checkpoint(ckpt)


# --------------------------------------------------------------------------------------
# real-file quirks HF accepts
# --------------------------------------------------------------------------------------


def _bare(tensors):
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def test_bare_body_keys_under_lm_config(tmp_path):
    """openai gpt2's model.safetensors stores `h.0...` without `transformer.` under GPT2LMHeadModel."""
    tensors = _bare(golden_tensors())
    assert "h.0.attn.c_attn.weight" in tensors and "wte.weight" in tensors
    assert_same_params(load_checkpoint(make_checkpoint(tmp_path, tensors)).params, load_checkpoint(LM).params)


def test_bare_body_keys_with_untied_head(tmp_path):
    case = os.path.join(GOLDEN, "gpt2", "lm-untied")
    tensors = _bare(golden_tensors(case))
    assert "lm_head.weight" in tensors
    assert_same_params(load_checkpoint(make_checkpoint(tmp_path, tensors, case)).params,
                       load_checkpoint(case).params)


def test_mixed_prefixes_are_refused(tmp_path):
    """Only a checkpoint with no `transformer.` key at all is read as bare."""
    tensors = golden_tensors()
    tensors["h.0.ln_1.weight"] = tensors.pop("transformer.h.0.ln_1.weight")
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.ln_1\.weight'"):
        load_checkpoint(make_checkpoint(tmp_path, tensors))


def test_gpt2model_checkpoint_with_prefixed_keys_is_refused(tmp_path):
    tensors = {"transformer." + k: v for k, v in golden_tensors(MODEL).items()}
    with pytest.raises(CheckpointError, match=r"missing tensor 'wte\.weight'"):
        load_checkpoint(make_checkpoint(tmp_path, tensors, MODEL))


@pytest.mark.parametrize("bare", [False, True], ids=["prefixed", "bare"])
def test_old_attention_buffers_are_dropped(tmp_path, bare):
    tensors = golden_tensors()
    for i in range(2):
        tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.float32))
        tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    if bare:
        tensors = _bare(tensors)
    assert_same_params(load_checkpoint(make_checkpoint(tmp_path, tensors)).params, load_checkpoint(LM).params)


def test_old_attention_buffers_dropped_for_gpt2model(tmp_path):
    tensors = golden_tensors(MODEL)
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.uint8)).astype(np.bool_)
    tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    assert_same_params(load_checkpoint(make_checkpoint(tmp_path, tensors, MODEL)).params,
                       load_checkpoint(MODEL).params)


def test_tied_lm_head_is_dropped(tmp_path):
    tensors = golden_tensors()
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    ck = load_checkpoint(make_checkpoint(tmp_path, tensors))
    assert ck.params.lm_head is None
    assert_same_params(ck.params, load_checkpoint(LM).params)


def test_buffer_pattern_is_not_too_broad(tmp_path):
    """Only `h.<i>.attn.bias|masked_bias` are dropped, not look-alikes."""
    tensors = golden_tensors()
    tensors["transformer.h.0.attn.c_attn.masked_bias"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.h\.0\.attn\.c_attn\.masked_bias'"):
        load_checkpoint(make_checkpoint(tmp_path, tensors))


# --------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------


def test_count_params_real_gpt2_without_allocating():
    with open(os.path.join(DATA, "configs", "gpt2.json")) as f:
        config = parse_gpt2_config(json.load(f))
    skeleton = gpt2_params.skeleton(config)
    tree_leaves = jax.tree_util.tree_leaves(skeleton)
    assert tree_leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in tree_leaves)
    assert count_params(skeleton) == 124_439_808
    assert count_gpt2_params(config) == 124_439_808
    assert skeleton.lm_head is None  # tied: the LM head adds nothing


def test_count_params_matches_formula_for_every_golden_body():
    for case in GOLDEN_CASES:
        ck_dir = os.path.join(GOLDEN, "gpt2", case)
        with open(os.path.join(ck_dir, "config.json")) as f:
            config = parse_gpt2_config(json.load(f))
        body = gpt2_params.skeleton(config).transformer
        assert count_params(body) == count_gpt2_params(config), case
