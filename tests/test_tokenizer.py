"""params/tokenizer.py: loading GPT-2's tokenizer from a checkpoint directory.

Core tier: known ids from the real GPT-2 files, round trips, error messages (no torch).
Reference tier (@pytest.mark.reference): ids agree with HF's GPT2TokenizerFast and
slow GPT2Tokenizer on hypothesis-drawn text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refjax.params.tokenizer import decode, encode, load_tokenizer

GPT2_DIR = Path(__file__).parent / "data" / "tokenizers" / "gpt2"
GPT2_VOCAB_SIZE = 50257
ENDOFTEXT = 50256

# Checked against HF GPT2TokenizerFast and GPT2Tokenizer in test_known_ids_match_hf.
KNOWN_IDS = [
    ("Hello world", [15496, 995]),
    (" Hello", [18435]),
    ("<|endoftext|>", [ENDOFTEXT]),
    ("Hello<|endoftext|>world", [15496, ENDOFTEXT, 6894]),
    (" <|endoftext|> ", [220, ENDOFTEXT, 220]),
    ("I'm here, aren't you?", [40, 1101, 994, 11, 3588, 470, 345, 30]),
    ("  two  spaces\n\nnewlines", [220, 734, 220, 9029, 198, 198, 3605, 6615]),
    ("x  \n\n y", [87, 220, 220, 628, 331]),
    ("你好，世界", [19526, 254, 25001, 121, 171, 120, 234, 10310, 244, 45911, 234]),
    ("😀 emoji", [47249, 222, 44805]),
    ("GPT-2 2019 3.14", [38, 11571, 12, 17, 13130, 513, 13, 1415]),
    ("", []),
]

# Text that stresses byte-level BPE: unicode of every kind, plus pieces GPT-2 treats
# specially (contractions, whitespace runs, digits, the special token).
PIECES = [
    "<|endoftext|>", "<|endoftext", "|>", " ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ",
    "\u00a0", "\u3000", "\u200b", "'s", "'ll", "'RE", " 's", "Hello", " world", "123", " 4567",
    "😀", "👨‍👩‍👧", "🇯🇵", "你好世界", "日本語のテキスト", "한국어", "café", "e\u0301", "Ωμέγα", "مرحبا",
]
TEXTS = st.lists(st.one_of(st.text(), st.sampled_from(PIECES)), max_size=12).map("".join)


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer(GPT2_DIR)


# --------------------------------------------------------------------------- core tier


@pytest.mark.parametrize("text, ids", KNOWN_IDS)
def test_known_ids(gpt2, text, ids):
    assert encode(gpt2, text) == ids
    assert decode(gpt2, ids) == text


def test_vocab_size_and_special_token(gpt2):
    assert gpt2.get_vocab_size(with_added_tokens=True) == GPT2_VOCAB_SIZE
    assert gpt2.token_to_id("<|endoftext|>") == ENDOFTEXT


@settings(deadline=None)
@given(text=st.one_of(st.text(), TEXTS))
def test_round_trip_and_id_range(gpt2, text):
    ids = encode(gpt2, text)
    assert all(0 <= i < GPT2_VOCAB_SIZE for i in ids)
    assert decode(gpt2, ids) == text


def test_decode_keeps_special_tokens_unless_asked(gpt2):
    ids = encode(gpt2, "a<|endoftext|>b")
    assert decode(gpt2, ids) == "a<|endoftext|>b"
    assert decode(gpt2, ids, skip_special_tokens=True) == "ab"


def test_decode_rejects_out_of_range_ids(gpt2):
    with pytest.raises(ValueError, match="50257"):
        decode(gpt2, [15496, GPT2_VOCAB_SIZE])
    with pytest.raises(ValueError, match="-1"):
        decode(gpt2, [-1])


def test_saved_tokenizer_json_round_trip(gpt2, tmp_path):
    gpt2.save(str(tmp_path / "tokenizer.json"))
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.to_str() == gpt2.to_str()
    for text, ids in KNOWN_IDS:
        assert encode(reloaded, text) == ids


def test_tokenizer_config_add_prefix_space_overrides_tokenizer_json(tmp_path):
    """As in HF: an explicit tokenizer_config.json value wins over tokenizer.json's."""
    _copy_slow_files(tmp_path, tokenizer_config={"add_prefix_space": True})
    load_tokenizer(tmp_path).save(str(tmp_path / "tokenizer.json"))
    assert encode(load_tokenizer(tmp_path), "Hello") == [18435]
    _copy_slow_files(tmp_path, tokenizer_config={"add_prefix_space": False})
    assert encode(load_tokenizer(tmp_path), "Hello") == [15496]


def test_config_json_model_type_picks_family(tmp_path):
    _copy_slow_files(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert encode(load_tokenizer(tmp_path), "Hello world") == [15496, 995]


def test_add_prefix_space_from_tokenizer_config(tmp_path):
    _copy_slow_files(tmp_path, tokenizer_config={"add_prefix_space": True})
    assert encode(load_tokenizer(tmp_path), "Hello world") == [18435, 995]


def test_add_bos_token_from_tokenizer_config(tmp_path):
    _copy_slow_files(tmp_path, tokenizer_config={"add_bos_token": True, "bos_token": "<|endoftext|>"})
    tokenizer = load_tokenizer(tmp_path)
    assert encode(tokenizer, "Hello world") == [ENDOFTEXT, 15496, 995]
    assert encode(tokenizer, "Hello world", add_special_tokens=False) == [15496, 995]


def test_additional_special_tokens_get_new_ids(tmp_path):
    _copy_slow_files(tmp_path, tokenizer_config={"additional_special_tokens": ["<|pad|>"]})
    tokenizer = load_tokenizer(tmp_path)
    assert encode(tokenizer, "a<|pad|>b") == [64, GPT2_VOCAB_SIZE, 65]


# --------------------------------------------------------------------------- errors


def test_empty_dir_names_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    for name in (str(tmp_path), "tokenizer.json", "vocab.json", "merges.txt"):
        assert name in message


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")


def test_missing_merges_is_named(tmp_path):
    shutil.copy(GPT2_DIR / "vocab.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing: merges.txt"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"a": "zero"}', b'{"a": -1}', b'{"a": true}', b"\xff\xfe"],
    ids=["syntax", "not-object", "str-id", "negative-id", "bool-id", "not-utf8"],
)
def test_corrupt_vocab_json_names_file(tmp_path, content):
    _copy_slow_files(tmp_path)
    (tmp_path / "vocab.json").write_bytes(content)
    with pytest.raises(ValueError, match="vocab.json"):
        load_tokenizer(tmp_path)


def test_corrupt_merges_names_file(tmp_path):
    _copy_slow_files(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n")
    with pytest.raises(ValueError, match=r"merges.txt.*line 3"):
        load_tokenizer(tmp_path)


def test_merge_of_unknown_tokens_names_file(tmp_path):
    _copy_slow_files(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nnot_a_token other\n")
    with pytest.raises(ValueError, match="merges.txt"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ['{"model": ', '{"version": "1.0", "model": {"type": "Nope"}}'])
def test_corrupt_tokenizer_json_names_file(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "config.json"])
def test_corrupt_config_files_name_file(tmp_path, name):
    _copy_slow_files(tmp_path)
    (tmp_path / name).write_text("{oops")
    with pytest.raises(ValueError, match=name):
        load_tokenizer(tmp_path)


def test_bad_special_token_entry_names_file(tmp_path):
    _copy_slow_files(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": 7}))
    with pytest.raises(ValueError, match="special_tokens_map.json"):
        load_tokenizer(tmp_path)


def test_unsupported_family_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))  # (roformer now has a builder)
    with pytest.raises(ValueError, match="bert.*gpt2"):
        load_tokenizer(tmp_path)


def _copy_slow_files(directory: Path, tokenizer_config: dict | None = None) -> None:
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(GPT2_DIR / name, directory)
    config = json.loads((GPT2_DIR / "tokenizer_config.json").read_text())
    config.update(tokenizer_config or {})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------- reference tier


def _import_transformers():
    return pytest.importorskip(
        "transformers", reason="reference tier needs the `reference` extra (transformers)"
    )


@pytest.fixture(scope="module")
def hf():
    transformers = _import_transformers()
    return {
        "fast": transformers.GPT2TokenizerFast.from_pretrained(GPT2_DIR),
        "slow": transformers.GPT2Tokenizer.from_pretrained(GPT2_DIR),
    }


@pytest.fixture(scope="module")
def hf_tokenizer_json_dir(hf, tmp_path_factory):
    """A copy of the GPT-2 dir plus the tokenizer.json that HF's save_pretrained writes."""
    directory = tmp_path_factory.mktemp("gpt2-hf-saved")
    shutil.copytree(GPT2_DIR, directory, dirs_exist_ok=True)
    hf["fast"].save_pretrained(directory)
    assert (directory / "tokenizer.json").is_file()
    return directory


@pytest.fixture(scope="module")
def ours_from_hf_json(hf_tokenizer_json_dir):
    return load_tokenizer(hf_tokenizer_json_dir)


@pytest.mark.reference
def test_built_tokenizer_serializes_like_hf(hf, gpt2):
    """Our vocab+merges build is GPT2Converter's output, byte for byte."""
    assert gpt2.to_str() == hf["fast"].backend_tokenizer.to_str()


@pytest.mark.reference
@pytest.mark.parametrize("text, ids", KNOWN_IDS)
def test_known_ids_match_hf(hf, text, ids):
    assert hf["fast"].encode(text) == ids
    assert hf["slow"].encode(text) == ids


@pytest.mark.reference
@settings(max_examples=200, deadline=None)
@given(text=TEXTS)
def test_ids_match_hf_fast_and_slow(hf, gpt2, ours_from_hf_json, text):
    ours = encode(gpt2, text)
    assert ours == hf["fast"].encode(text)
    assert ours == hf["slow"].encode(text)
    assert encode(ours_from_hf_json, text) == ours
    assert decode(gpt2, ours) == hf["fast"].decode(ours)


@pytest.mark.reference
@pytest.mark.parametrize(
    "tokenizer_config",
    [{"add_prefix_space": True}, {"add_bos_token": True}, {"additional_special_tokens": ["<|pad|>"]}],
    ids=["add_prefix_space", "add_bos_token", "additional_special_tokens"],
)
def test_tokenizer_config_options_match_hf(tmp_path, tokenizer_config):
    transformers = _import_transformers()
    _copy_slow_files(tmp_path, tokenizer_config)
    ours = load_tokenizer(tmp_path)
    fast = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    slow = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    for text in ["Hello world", " Hello<|endoftext|>x", "a<|pad|>b", "\n  y", ""]:
        assert encode(ours, text) == fast.encode(text), text
        if not tokenizer_config.get("add_prefix_space"):
            assert encode(ours, text) == slow.encode(text), text


@pytest.mark.reference
def test_hf_slow_and_fast_disagree_on_add_prefix_space(tmp_path):
    """With add_prefix_space=True HF's two GPT-2 tokenizers differ; we follow the fast one.
    Fast (tokenizers' ByteLevel) prefixes a space to each segment between special tokens
    unless it already starts with one; slow prepends one space to the whole text, always."""
    transformers = _import_transformers()
    _copy_slow_files(tmp_path, {"add_prefix_space": True})
    ours = load_tokenizer(tmp_path)
    fast = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    slow = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    for text, fast_ids, slow_ids in [
        (" a", [257], [220, 257]),
        ("a<|endoftext|>b", [257, ENDOFTEXT, 275], [257, ENDOFTEXT, 65]),
        ("", [], [220]),
    ]:
        assert encode(ours, text) == fast.encode(text) == fast_ids
        assert slow.encode(text) == slow_ids
