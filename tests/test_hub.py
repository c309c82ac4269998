"""Model ids read offline from the local HF cache (params/hub.py), as `from_pretrained(...,
local_files_only=True)` reads them: `load_checkpoint("org/name", revision=...)` and every CLI
command that takes a checkpoint.

Each test lays out a cache itself in tmp_path, in huggingface_hub's format (blobs/, snapshots/<commit>/
with relative symlinks into blobs/, refs/<branch or tag> holding a commit hash), from golden
checkpoints, and points HF_HUB_CACHE (or HF_HOME) at it.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import pytest

from conftest import GOLDEN
from refjax.params import hub
from refjax.params.checkpoint import load_checkpoint, load_config
from refjax.params.io import read_safetensors, write_safetensors
from refjax.params.tokenizer import load_tokenizer
from refjax.tooling.cli import main

MODEL_ID = "refjax-test/tiny-gpt2"
COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"  # 40 hex digits: a commit hash
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"
LM = os.path.join(GOLDEN, "gpt2", "lm")  # with tokenizer files
SEQCLS = os.path.join(GOLDEN, "gpt2", "seqcls-single")


def add_snapshot(cache, model_id: str, commit: str, source_dir: str, refs=("main",)) -> str:
    """Put `source_dir`'s files (all but golden.safetensors) into the cache as snapshot
    `commit` of `model_id`, the way huggingface_hub stores a download; point `refs` at it."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name in sorted(os.listdir(source_dir)):
        if name == "golden.safetensors":
            continue
        data = open(os.path.join(source_dir, name), "rb").read()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline
    return str(snapshot)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An HF cache with MODEL_ID: main -> commit A (gpt2/lm), tag v1 -> commit B (gpt2/seqcls-single)."""
    root = tmp_path / "hub"
    add_snapshot(root, MODEL_ID, COMMIT_A, LM, refs=("main",))
    add_snapshot(root, MODEL_ID, COMMIT_B, SEQCLS, refs=("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return root


def same_params(a, b) -> bool:
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True))


def test_model_id_loads_the_main_snapshot(cache):
    ckpt = load_checkpoint(MODEL_ID)
    assert ckpt.config.architecture == "GPT2LMHeadModel"
    assert same_params(ckpt, load_checkpoint(LM))
    assert hub.resolve(MODEL_ID) == str(cache / "models--refjax-test--tiny-gpt2" / "snapshots" / COMMIT_A)


@pytest.mark.parametrize("revision, expected", [
    ("main", "GPT2LMHeadModel"), ("v1", "GPT2ForSequenceClassification"),  # by ref name (branch, tag)
    (COMMIT_A, "GPT2LMHeadModel"), (COMMIT_B, "GPT2ForSequenceClassification"),  # by commit hash
])
def test_revision_by_ref_name_and_by_commit_hash(cache, revision, expected):
    ckpt = load_checkpoint(MODEL_ID, revision=revision)
    assert ckpt.config.architecture == expected
    assert same_params(ckpt, load_checkpoint(LM if expected == "GPT2LMHeadModel" else SEQCLS))
    assert load_config(MODEL_ID, revision=revision)[1].architecture == expected


def test_hf_home_picks_the_cache_too(tmp_path, monkeypatch):
    add_snapshot(tmp_path / "home" / "hub", MODEL_ID, COMMIT_A, LM)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == str(tmp_path / "home" / "hub")
    assert load_checkpoint(MODEL_ID).config.architecture == "GPT2LMHeadModel"


def test_unknown_id_is_one_error_naming_id_revision_and_cache(cache):
    with pytest.raises(hub.ModelNotFoundError) as e:
        load_checkpoint("refjax-test/no-such-model")
    message = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "'refjax-test/no-such-model'" in message and "revision 'main'" in message and str(cache) in message


def test_unknown_revision_names_what_the_cache_holds(cache):
    with pytest.raises(hub.ModelNotFoundError) as e:
        load_checkpoint(MODEL_ID, revision="v2")
    message = str(e.value)
    assert "revision 'v2'" in message and str(cache) in message
    assert "refs main, v1" in message and COMMIT_A[:12] in message
    with pytest.raises(hub.ModelNotFoundError, match="revision 'c{40}'"):
        load_checkpoint(MODEL_ID, revision="c" * 40)


def test_a_path_that_exists_wins_over_the_cache(cache, tmp_path, monkeypatch):
    local = tmp_path / "work"
    (local / MODEL_ID).mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(SEQCLS, name), local / MODEL_ID / name)
    monkeypatch.chdir(local)
    assert load_checkpoint(MODEL_ID).config.architecture == "GPT2ForSequenceClassification"
    with pytest.raises(ValueError, match="revision 'v1' applies to model ids"):
        load_checkpoint(MODEL_ID, revision="v1")


def test_a_missing_path_that_is_no_id_keeps_the_plain_error(cache):
    with pytest.raises(FileNotFoundError, match="checkpoint directory '/no/such/dir' does not exist"):
        load_checkpoint("/no/such/dir")


def test_tokenizer_of_a_model_id(cache):
    assert load_tokenizer(MODEL_ID).encode("Hello").ids == load_tokenizer(LM).encode("Hello").ids


# --------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_forward_on_a_model_id_and_revision(cache, capsys, tmp_path):
    golden, _ = read_safetensors(os.path.join(LM, "golden.safetensors"))
    inputs = tmp_path / "in.safetensors"
    write_safetensors(inputs, {"input_ids": golden["input_ids"], "attention_mask": golden["attention_mask"]})
    out = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "forward", MODEL_ID, "--inputs", str(inputs), "--out", str(out))
    assert code == 0, err
    np.testing.assert_allclose(read_safetensors(out)[0]["logits"], golden["float32/logits"], rtol=1e-5, atol=1e-5)
    golden, _ = read_safetensors(os.path.join(SEQCLS, "golden.safetensors"))
    write_safetensors(inputs, {"input_ids": golden["input_ids"], "attention_mask": golden["attention_mask"]})
    code, _, err = run(capsys, "forward", MODEL_ID, "--revision", "v1", "--inputs", str(inputs), "--out", str(out))
    assert code == 0, err
    assert read_safetensors(out)[1]["architecture"] == "GPT2ForSequenceClassification"
    code, _, err = run(capsys, "forward", MODEL_ID, "--text", "Hello", "--out", str(out))  # tokenizer from the snapshot
    assert code == 0, err


def test_cli_generate_on_a_model_id(cache, capsys):
    code, out, err = run(capsys, "generate", MODEL_ID, "--prompt", "The", "--max-new-tokens", "2")
    assert code == 0, err
    assert out.startswith("The")


@pytest.mark.parametrize("argv, culprits", [
    (["forward", "refjax-test/missing", "--text", "x", "--out", "OUT"], ["'refjax-test/missing'", "revision 'main'"]),
    (["forward", MODEL_ID, "--revision", "v9", "--text", "x", "--out", "OUT"], ["revision 'v9'", "refs main, v1"]),
    (["generate", "refjax-test/missing", "--prompt", "x"], ["'refjax-test/missing'"]),
    (["convert", "refjax-test/missing", "OUT"], ["'refjax-test/missing'"]),
])
def test_cli_unknown_id_exits_2_naming_id_and_cache(cache, capsys, tmp_path, argv, culprits):
    out_path = str(tmp_path / "out.safetensors")
    code, _, err = run(capsys, *[out_path if a == "OUT" else a for a in argv])
    assert code == 2 and err.startswith("refjax: error: ") and "Traceback" not in err
    assert all(c in err for c in culprits) and str(cache) in err
    assert not os.path.exists(out_path)


def test_transformers_resolves_the_same_snapshot(cache):
    """The layout these tests build is the one `from_pretrained(local_files_only=True)` reads."""
    transformers = pytest.importorskip("transformers", reason="needs the `reference` extra")
    for revision, expected in (("main", "GPT2LMHeadModel"), ("v1", "GPT2ForSequenceClassification"),
                               (COMMIT_B, "GPT2ForSequenceClassification")):
        config = transformers.AutoConfig.from_pretrained(MODEL_ID, revision=revision, local_files_only=True,
                                                         cache_dir=str(cache))
        assert config.architectures == [expected] == [load_config(MODEL_ID, revision=revision)[1].architecture]
