"""The offline tokenizers: both languages reach the encoders as comparable pieces."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dittune.models.tiny_text import write_bert_tokenizer, write_t5_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tokenizers")
    write_bert_tokenizer(root / "bert")
    size = write_t5_tokenizer(root / "t5")
    return AutoTokenizer.from_pretrained(root / "bert"), AutoTokenizer.from_pretrained(root / "t5"), size


def _pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_t5_keeps_english_words_whole(tokenizers) -> None:
    _, t5, _ = tokenizers
    assert _pieces(t5, "a red circle on a blue background") == [
        "▁a", "▁red", "▁circle", "▁on", "▁a", "▁blue", "▁background", "</s>",
    ]  # fmt: skip


@pytest.mark.parametrize("text", ["蓝色背景上的红色圆形", "青色背景上的紫色星形", "一个红色的圆环"])
def test_chinese_is_split_into_characters_by_both_tokenizers(tokenizers, text: str) -> None:
    bert, t5, _ = tokenizers
    assert _pieces(t5, text) == [*text, "</s>"]
    assert _pieces(bert, text) == ["[CLS]", *text, "[SEP]"]


def test_vocab_size_is_reported_and_bounded(tokenizers) -> None:
    _, t5, size = tokenizers
    assert size == len(t5) <= 256
    assert t5.pad_token_id == 0 and t5.eos_token_id == 1 and t5.unk_token_id == 2
