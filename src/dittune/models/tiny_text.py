"""Offline tokenizers for tiny test models: a BERT WordPiece vocab and a sentencepiece model.

Both are generated from a small bilingual (English/Chinese) corpus, so tiny pipelines can be built
with no hub access. Loading goes through `from_pretrained` on the written folder, the same path real
checkpoints take.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

COLOURS = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "white": "白色", "black": "黑色",
    "purple": "紫色", "orange": "橙色", "gray": "灰色", "pink": "粉色", "brown": "棕色", "cyan": "青色",
}  # fmt: skip
SHAPES = {
    "circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "ring": "圆环",
    "cross": "十字", "diamond": "菱形", "heart": "心形", "stripe": "条纹", "dot": "圆点",
}  # fmt: skip
EXTRA_WORDS = (
    "a an the of on in with and photo picture painting drawing image of small large big tiny "
    "background pattern texture checkered striped dotted random generate cat dog house tree sky "
    "sun moon portrait landscape style bright dark light high quality blurry low"
).split()


def caption_corpus() -> list[str]:
    """English and Chinese captions covering colours, shapes and backgrounds."""
    lines = []
    for (c_en, c_zh), (s_en, s_zh), (b_en, b_zh) in itertools.product(COLOURS.items(), SHAPES.items(), COLOURS.items()):
        if c_en == b_en:
            continue
        lines.append(f"a {c_en} {s_en} on a {b_en} background")
        lines.append(f"{b_zh}背景上的{c_zh}{s_zh}")
    lines.append(" ".join(EXTRA_WORDS))
    lines.append("随机生成一张图片")
    return lines


def bert_vocab() -> list[str]:
    """WordPiece vocab: specials first ([PAD] = 0), then characters, words and CJK characters."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-/")
    words = sorted(set(COLOURS) | set(SHAPES) | set(EXTRA_WORDS))
    cjk = sorted({ch for line in caption_corpus() for ch in line if "\u4e00" <= ch <= "\u9fff"})
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    seen: dict[str, None] = {}
    for token in specials + chars + words + cjk + pieces:
        seen.setdefault(token, None)
    return list(seen)


def write_bert_tokenizer(out_dir: Path, max_length: int = 77) -> None:
    """Write a BERT tokenizer folder (vocab.txt + config), then round-trip it through transformers."""
    from transformers import BertTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        (src / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
        (src / "tokenizer_config.json").write_text(
            json.dumps({"do_lower_case": True, "tokenize_chinese_chars": True, "model_max_length": max_length})
        )
        tokenizer = BertTokenizer.from_pretrained(src)
        tokenizer.save_pretrained(out_dir)
    (out_dir / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")


def write_t5_tokenizer(out_dir: Path, vocab_size: int = 256, max_length: int = 256) -> int:
    """Train a unigram sentencepiece model (mT5 ids: pad 0, eos 1, unk 2) and save a T5 tokenizer.

    Returns the vocabulary size.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        corpus = src / "corpus.txt"
        corpus.write_text("\n".join(caption_corpus()) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(src / "spiece"),
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        (src / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": max_length, "extra_ids": 0, "legacy": True})
        )
        tokenizer = T5Tokenizer.from_pretrained(src, extra_ids=0)
        tokenizer.save_pretrained(out_dir)
        (out_dir / "spiece.model").write_bytes((src / "spiece.model").read_bytes())
        return len(tokenizer)
