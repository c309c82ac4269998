"""RoFormer tokenizer: vocab.txt + rjieba pre-tokenizer built in code (params/tokenizer.py).
Golden ids (tests/test_golden.py, roformer/mlm-tokenizer) cover the shipped small vocab; here:
a real 21128-token Chinese BERT vocab against HF's RoFormerTokenizerFast live (vocab.txt only,
and a saved tokenizer.json whose BertPreTokenizer refjax must replace by jieba, as HF does), and
the clear error when rjieba is missing."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from conftest import DATA, GOLDEN
from refjax.params import tokenizer as tokenizer_lib

VOCAB = os.path.join(DATA, "tokenizers", "chinese-bert-vocab", "vocab.txt")
TEXTS = [
    "今天天气非常好。",
    "我爱北京天安门！Hello World, RoFormer是一个基于旋转位置编码的模型。",
    "混合English和中文，数字123和4.5%……还有emoji😀",
    "  空格  和\t制表符\n换行 ",
    "Ｆｕｌｌｗｉｄｔｈ：「引号」《书名》——破折号",
    "naïve café Straße",
    "[CLS] 特殊 [MASK] token [SEP]",
    "",
]


def directory(tmp_path, with_tokenizer_json: bool):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("rjieba")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(VOCAB, src / "vocab.txt")
    out = tmp_path / "out"
    transformers.RoFormerTokenizerFast(str(src / "vocab.txt")).save_pretrained(
        out, legacy_format=not with_tokenizer_json)
    (out / "config.json").write_text(json.dumps({"model_type": "roformer"}))
    return out, transformers.RoFormerTokenizerFast.from_pretrained(out)


@pytest.mark.reference
@pytest.mark.parametrize("with_tokenizer_json", [False, True])
def test_real_chinese_vocab_ids_equal_hf(tmp_path, with_tokenizer_json):
    out, hf = directory(tmp_path, with_tokenizer_json)
    assert (out / "tokenizer.json").exists() == with_tokenizer_json
    ours = tokenizer_lib.load_tokenizer(out)
    for text in TEXTS:
        assert tokenizer_lib.encode(ours, text) == hf(text)["input_ids"], text
    # (this vocab is per character, so jieba's multi-character words fall back to characters;
    # the golden small vocab below has whole words)


def test_golden_small_vocab_keeps_in_vocab_words_whole():
    pytest.importorskip("rjieba")
    tok = tokenizer_lib.load_tokenizer(os.path.join(GOLDEN, "roformer", "mlm-tokenizer"))
    tokens = tok.encode("今天天气非常好。").tokens
    assert tokens == ["[CLS]", "今", "天", "天", "气", "非常", "好", "。", "[SEP]"]  # jieba: 今天天气 | 非常 | 好 | 。


def test_missing_rjieba_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rjieba", None)  # import rjieba -> ImportError
    with pytest.raises(ImportError) as e:
        tokenizer_lib.load_tokenizer(os.path.join(GOLDEN, "roformer", "mlm-tokenizer"))
    assert isinstance(e.value, tokenizer_lib.MissingDependencyError)
    assert "pip install rjieba" in str(e.value)
