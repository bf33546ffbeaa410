"""One tokenizer and one frozen text encoder from a pipeline folder (the T5 / UMT5 families share this)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class SingleTextEncoder:
    """A tokenizer (MODEL/tokenizer) and its frozen encoder (MODEL/text_encoder) on `device`."""

    tokenizer: Any
    encoder: nn.Module
    device: torch.device


def load_single_text_encoder(
    path: Path, encoder_class: str, device: torch.device, dtype: torch.dtype
) -> SingleTextEncoder:
    """`encoder_class` (a transformers class name, e.g. "T5EncoderModel") from MODEL/text_encoder, frozen in eval
    mode on `device`, with the tokenizer from MODEL/tokenizer."""
    import transformers

    encoder = getattr(transformers, encoder_class).from_pretrained(Path(path) / "text_encoder", dtype=dtype)
    encoder.to(device).eval().requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(path) / "tokenizer")
    return SingleTextEncoder(tokenizer=tokenizer, encoder=encoder, device=device)
