"""An offline Llama tokenizer for the tiny HunyuanVideo pipeline.

HunyuanVideo wraps every prompt in a chat template and drops the template's first ``crop_start`` (95)
tokens from the Llama output. The real tokenizer (Llama 3's byte-level BPE) cuts the template into
exactly 95 pieces: every word, punctuation mark, digit and ``"\\n\\n"`` is one token, plus BOS and the
header/eot special tokens. This module builds a small BPE tokenizer that cuts the template the same way,
so the stock crop removes the whole template and nothing of the prompt.

The tokenizer is the SentencePiece-style BPE that transformers' `LlamaTokenizer` (alias
`LlamaTokenizerFast`) builds itself (``▁`` for spaces, byte fallback), so it survives a round trip
through `LlamaTokenizerFast.from_pretrained`, which is how `HunyuanVideoPipeline` loads it. Merges are
learned on the template and `caption_corpus()`, with word boundaries as Llama 3 draws them; CJK
characters stay single tokens. Deterministic: ties between pairs are broken alphabetically.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path
from typing import Any

from dittune.models.tiny_text import caption_corpus, cjk_characters

BOS, EOS, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"
CHAT_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPACE = "▁"
_CJK = "\u4e00-\u9fff"
_PIECE = re.compile(rf"▁?[^\W\d_{_CJK}]+|[{_CJK}]|\d|▁?[^\w\s▁]+|\n+|▁")
"""Word boundaries as Llama 3 draws them: an optional leading space, then letters, one digit, a run of
punctuation, or newlines; a lone space before a digit. CJK characters one at a time."""


def pieces(text: str) -> list[str]:
    """The pre-tokens of `text` that merges never cross (special tokens removed)."""
    out: list[str] = []
    for segment in re.split("|".join(map(re.escape, CHAT_SPECIALS)), text):
        out += _PIECE.findall(segment.replace(" ", SPACE))
    return out


def learn_merges(words: Counter[tuple[str, ...]]) -> list[tuple[str, str]]:
    """BPE merges until every word is one token, most frequent pair first (ties: smallest pair)."""
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            merged[_merge(word, best)] += count
        words = merged


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def vocab_and_merges(template: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Specials, the 256 byte-fallback tokens, single characters, then merged tokens."""
    words: Counter[tuple[str, ...]] = Counter()
    for line in [template, *caption_corpus()]:
        words.update(tuple(piece) for piece in pieces(line))
    merges = learn_merges(words)
    characters = sorted({ch for word in words for ch in word} | set(cjk_characters()))
    tokens = [UNK, BOS, EOS, *(f"<0x{b:02X}>" for b in range(256)), *characters, *(a + b for a, b in merges)]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def llama_tokenizer(
    template: str, padding_side: str = "right", max_length: int = 512, extra_special_tokens: Any = ()
) -> Any:
    """A `LlamaTokenizerFast` whose pieces of `template` match Llama 3's: BOS prepended, EOS as the pad token."""
    from transformers import LlamaTokenizerFast

    vocab, merges = vocab_and_merges(template)
    return LlamaTokenizerFast(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        add_bos_token=True,
        padding_side=padding_side,
        model_max_length=max_length,
        extra_special_tokens=extra_special_tokens,
    )


def write_llama_tokenizer(out_dir: Path, template: str, max_length: int = 512) -> int:
    """Save a `LlamaTokenizerFast` folder whose pieces of `template` match Llama 3's; returns its size.

    Padding goes on the right (the pipeline's crop and the transformer's text mask both assume it), as in the
    Llama 3 checkpoints HunyuanVideo ships.
    """
    tokenizer = llama_tokenizer(template, "right", max_length, list(CHAT_SPECIALS))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return len(tokenizer)
