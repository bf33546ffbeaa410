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
    lines.append("一个小的大的")
    return lines


def cjk_characters() -> list[str]:
    """Every CJK character of the corpus, sorted."""
    return sorted({ch for line in caption_corpus() for ch in line if "\u4e00" <= ch <= "\u9fff"})


def bert_vocab() -> list[str]:
    """WordPiece vocab: specials first ([PAD] = 0), then characters, words and CJK characters."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-/")
    words = sorted(set(COLOURS) | set(SHAPES) | set(EXTRA_WORDS))
    cjk = cjk_characters()
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
    """Train a sentencepiece model (mT5 ids: pad 0, eos 1, unk 2) and save a T5 tokenizer.

    English words become whole pieces ("▁red") and every CJK character is its own piece, roughly as in
    mT5's vocabulary. BPE rather than mT5's unigram: on a corpus this small and repetitive, unigram
    splits English words into letters and turns whole Chinese phrases ("蓝色背景上的红色") into single
    opaque tokens, so the two languages would reach the model in very different forms.
    `vocab_size` is an upper bound. Returns the vocabulary size.
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
            model_type="bpe",
            character_coverage=1.0,
            user_defined_symbols=cjk_characters(),
            hard_vocab_limit=False,
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


CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP `bytes_to_unicode`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def clip_vocab_and_merges(num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE (vocab, merges) learned from the English lines of `caption_corpus()`.

    The vocabulary starts like CLIP's (every byte, then every byte with the end-of-word mark `</w>`),
    so any text tokenizes without unknown tokens; then come the learned merges, most frequent pair
    first (ties broken alphabetically, so the result is deterministic), then the two special tokens.
    """
    from collections import Counter

    from transformers import CLIPTokenizer

    splitter = CLIPTokenizer(vocab={s: i for i, s in enumerate(CLIP_SPECIALS)}, merges=[])._tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for line in (line for line in caption_corpus() if line.isascii()):  # CLIP is an English vocabulary
        for piece, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(line)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1
    alphabet = _byte_alphabet()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab_list.append(best[0] + best[1])
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    vocab_list += list(CLIP_SPECIALS)
    return {token: index for index, token in enumerate(vocab_list)}, merges


def write_clip_tokenizer(out_dir: Path, max_length: int = 77, pad_token: str = "<|endoftext|>") -> int:
    """Save a `CLIPTokenizer` folder (vocab.json, merges.txt) built by `clip_vocab_and_merges`.

    `pad_token` as in the real checkpoints: "<|endoftext|>" for CLIP-L, "!" for OpenCLIP bigG.
    Returns the vocabulary size.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return len(tokenizer)
