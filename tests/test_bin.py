"""PyTorch checkpoints: `pytorch_model.bin` and its sharded index, read with
`torch.load(weights_only=True)` only (params/io.py), and `refjax convert` to safetensors.

Core tier (torch only, no transformers): state dicts written with `torch.save`, the
refusal of a pickle that holds more than tensors, the error without torch, safetensors
preferred, convert (atomic, progress lines, modes). Reference tier: golden models saved by
HF `save_pretrained(..., safe_serialization=False)`, single file and sharded, load bit for
bit equal to the safetensors goldens, and convert back.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from conftest import GOLDEN
from refjax.params import io
from refjax.params.checkpoint import convert_checkpoint, load_checkpoint
from refjax.params.io import CheckpointError, TorchNotInstalledError, read_checkpoint_tensors
from refjax.tooling.cli import main

LM = os.path.join(GOLDEN, "gpt2", "lm")  # config + tokenizer files + model.safetensors
# One or two cases per family; arcee/bf16 checks bfloat16, the I-BERT quant case buffers.
HF_CASES = ["gpt2/lm", "gpt2/double-heads", "arcee/bf16", "arcee/causal-lm-tied", "roformer/mlm",
            "ibert/quant-seqcls", "mega/causal-lm"]


def golden_tensors(case_dir: str) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in read_checkpoint_tensors(case_dir).items()}


def same_params(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def copy_other_files(case_dir: str, out) -> None:
    """config.json and tokenizer files of a golden case (no weights, no goldens)."""
    out.mkdir(exist_ok=True)
    for name in os.listdir(case_dir):
        if not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copy(os.path.join(case_dir, name), out / name)


def torch_save_dir(torch, case_dir: str, out, shards: int = 1) -> dict[str, np.ndarray]:
    """The golden weights of `case_dir` as `pytorch_model.bin` (or `shards` shards + index), beside
    its config and tokenizer files, written by torch itself. Returns the tensors."""
    tensors = golden_tensors(case_dir)
    copy_other_files(case_dir, out)

    def as_torch(array):
        if array.dtype == np.dtype("bfloat16"):
            return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(array.copy())

    names = sorted(tensors)
    if shards == 1:
        torch.save({k: as_torch(tensors[k]) for k in names}, out / io.BIN_FILE)
        return tensors
    weight_map = {}
    for n in range(shards):
        file = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = names[n::shards]
        torch.save({k: as_torch(tensors[k]) for k in part}, out / file)
        weight_map.update({k: file for k in part})
    (out / io.BIN_INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="reading .bin needs torch (the `torch` or `reference` extra)")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------
# reading .bin (torch only)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_loads_bit_for_bit_like_safetensors(torch, tmp_path, shards):
    case = os.path.join(GOLDEN, "arcee", "bf16")
    tensors = torch_save_dir(torch, case, tmp_path / "bin", shards)
    read = read_checkpoint_tensors(tmp_path / "bin")
    assert sorted(read) == sorted(tensors)
    for name, array in tensors.items():
        assert read[name].dtype == array.dtype
        np.testing.assert_array_equal(read[name], array)
    same_params(load_checkpoint(tmp_path / "bin"), load_checkpoint(case))


def test_a_pickle_holding_more_than_tensors_is_refused(torch, tmp_path):
    copy_other_files(LM, tmp_path / "ckpt")
    state = {k: torch.from_numpy(v) for k, v in golden_tensors(LM).items()}
    state["extra"] = Payload()  # a custom class: a full unpickle would import and build it (and could run code)
    torch.save(state, tmp_path / "ckpt" / io.BIN_FILE)
    Payload.built = 0
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "ckpt")
    message = str(e.value)
    assert io.BIN_FILE in message and "refused" in message and "weights_only=True" in message
    assert "Unsupported global: GLOBAL test_bin.Payload" in message  # torch's reason names the class
    assert Payload.built == 0


class Payload:
    """Stands for any class a malicious pickle might carry."""
    built = 0

    def __setstate__(self, state):
        Payload.built += 1


@pytest.mark.parametrize("content, why", [(b"", "not a readable PyTorch checkpoint"),
                                          (b"not a pickle at all" * 4, "refused.*Unsupported operand")])
def test_a_corrupt_bin_names_the_file(torch, tmp_path, content, why):
    copy_other_files(LM, tmp_path / "ckpt")
    (tmp_path / "ckpt" / io.BIN_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=why) as e:
        load_checkpoint(tmp_path / "ckpt")
    assert io.BIN_FILE in str(e.value)


def test_a_truncated_bin_names_the_file(torch, tmp_path):
    torch_save_dir(torch, LM, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / io.BIN_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_non_tensor_entry_is_refused(torch, tmp_path):
    copy_other_files(LM, tmp_path / "ckpt")
    torch.save({"transformer.wte.weight": torch.zeros(2), "step": 3}, tmp_path / "ckpt" / io.BIN_FILE)
    with pytest.raises(CheckpointError, match="entry 'step' is a int, not a tensor"):
        read_checkpoint_tensors(tmp_path / "ckpt")


def test_without_torch_one_error_names_the_pip_command(tmp_path, monkeypatch, capsys):
    copy_other_files(LM, tmp_path / "ckpt")
    (tmp_path / "ckpt" / io.BIN_FILE).write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(TorchNotInstalledError, match=r"pip install 'refjax\[torch\]'"):
        load_checkpoint(tmp_path / "ckpt")
    code, _, err = run(capsys, "forward", str(tmp_path / "ckpt"), "--text", "x", "--out", str(tmp_path / "o.safetensors"))
    assert code == 2 and err.startswith("refjax: error: ") and "pip install 'refjax[torch]'" in err
    assert "Traceback" not in err


def test_safetensors_are_preferred_when_both_exist(tmp_path, monkeypatch):
    copy_other_files(LM, tmp_path / "ckpt")
    shutil.copy(os.path.join(LM, io.SINGLE_FILE), tmp_path / "ckpt")
    (tmp_path / "ckpt" / io.BIN_FILE).write_bytes(b"never read")
    monkeypatch.setitem(sys.modules, "torch", None)  # and torch is never imported
    same_params(load_checkpoint(tmp_path / "ckpt"), load_checkpoint(LM))


def test_no_weights_names_every_file_looked_for(tmp_path):
    copy_other_files(LM, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError) as e:
        load_checkpoint(tmp_path / "ckpt")
    assert all(name in str(e.value) for name, _ in io.WEIGHT_FILES)


# --------------------------------------------------------------------------------------
# refjax convert
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_convert_round_trips(torch, tmp_path, capsys, shards):
    tensors = torch_save_dir(torch, LM, tmp_path / "bin", shards)
    out = tmp_path / "st"
    code, _, err = run(capsys, "convert", str(tmp_path / "bin"), str(out))
    assert code == 0, err
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert len(progress) == shards and progress[-1].startswith(f"[{shards}/{shards}]")
    files = sorted(os.listdir(out))
    weights = [io.SINGLE_FILE] if shards == 1 else (
        [f"model-{n:05d}-of-{shards:05d}.safetensors" for n in range(1, shards + 1)] + [io.INDEX_FILE])
    others = sorted(n for n in os.listdir(LM) if not n.endswith(".safetensors"))
    assert files == sorted(weights + others)  # config, generation config and tokenizer files copied
    for name in others:
        assert (out / name).read_bytes() == open(os.path.join(LM, name), "rb").read()
    read = read_checkpoint_tensors(out)
    assert sorted(read) == sorted(tensors)
    for name, array in tensors.items():
        assert read[name].dtype == array.dtype
        np.testing.assert_array_equal(read[name], array)
    same_params(load_checkpoint(out), load_checkpoint(LM))
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert all((out / f).stat().st_mode & 0o777 == 0o666 & ~umask for f in files)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_convert_failing_midway_leaves_nothing(torch, tmp_path, capsys):
    torch_save_dir(torch, LM, tmp_path / "bin", shards=3)
    (tmp_path / "bin" / "pytorch_model-00003-of-00003.bin").write_bytes(b"corrupt")
    code, _, err = run(capsys, "convert", str(tmp_path / "bin"), str(tmp_path / "st"))
    assert code == 2 and "pytorch_model-00003-of-00003.bin" in err and "Traceback" not in err
    assert "[2/3]" in err  # the first shards were converted, then the run failed ...
    assert sorted(os.listdir(tmp_path)) == ["bin"]  # ... and left neither the output nor its temp directory


def test_convert_refuses_an_unsafe_pickle_and_writes_nothing(torch, tmp_path, capsys):
    copy_other_files(LM, tmp_path / "bin")
    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "bin" / io.BIN_FILE)
    code, _, err = run(capsys, "convert", str(tmp_path / "bin"), str(tmp_path / "st"))
    assert code == 2 and "refused" in err
    assert sorted(os.listdir(tmp_path)) == ["bin"]


def test_convert_refuses_an_existing_output(tmp_path, capsys):
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", LM, str(tmp_path / "st"))
    assert code == 2 and "already exists" in err and str(tmp_path / "st") in err
    assert os.listdir(tmp_path / "st") == ["keep.txt"]


def test_convert_of_safetensors_is_a_faithful_copy(tmp_path):
    names = convert_checkpoint(os.path.join(GOLDEN, "arcee", "sharded"), tmp_path / "st")
    assert "model.safetensors.index.json" in names
    same_params(load_checkpoint(tmp_path / "st"), load_checkpoint(os.path.join(GOLDEN, "arcee", "sharded")))


# --------------------------------------------------------------------------------------
# reference tier: what HF itself writes
# --------------------------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("case", HF_CASES)
@pytest.mark.parametrize("max_shard_size", [None, "4KB"])
def test_hf_save_pretrained_bin_loads_bit_for_bit(torch, tmp_path, case, max_shard_size):
    transformers = pytest.importorskip("transformers", reason="needs the `reference` extra")
    case_dir = os.path.join(GOLDEN, case)
    architecture = json.load(open(os.path.join(case_dir, "config.json")))["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(case_dir, dtype="auto")  # keeps bf16 bf16
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path / "bin", safe_serialization=False, **kwargs)
    files = os.listdir(tmp_path / "bin")
    assert (io.BIN_INDEX_FILE in files) == bool(max_shard_size) and not any(f.endswith(".safetensors") for f in files)
    same_params(load_checkpoint(tmp_path / "bin"), load_checkpoint(case_dir))
    convert_checkpoint(tmp_path / "bin", tmp_path / "st")
    same_params(load_checkpoint(tmp_path / "st"), load_checkpoint(case_dir))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "st").architectures == [architecture]
    reloaded = getattr(transformers, architecture).from_pretrained(tmp_path / "st")  # HF reads what convert wrote
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
