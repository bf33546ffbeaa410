"""dittune: fine-tune diffusion transformers (Hunyuan-DiT first) on your own images."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_lora"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import dittune` (and the CLI) does not import torch.
    if name == "load_lora":
        from dittune.lora import load_lora

        return load_lora
    raise AttributeError(name)
