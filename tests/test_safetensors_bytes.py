"""Files dittune writes through `dittune.safetensors_bytes` (cache entries, LoRAs) have reproducible bytes:
safetensors orders a header differently in each process, so equal tensors and metadata written by two processes
would otherwise differ byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open

WRITE = """
import sys, torch
from pathlib import Path
from dittune.export.lora_file import LoraInfo, save_lora
state = {f"blocks.{i}.attn.to_{p}.lora_{ab}.weight": torch.full((4, 4), float(i)) for i in range(3) for p in "qkv"
         for ab in "AB"}
info = LoraInfo(family="hunyuan-dit", component="transformer", key_prefix=None, rank=4, alpha=4.0,
                targets=["to_q", "to_k", "to_v"], base_model="m", version="v1.2", extra={"b": 1, "a": [2, 3]})
save_lora(Path(sys.argv[1]), state, info)
"""


def test_a_lora_written_by_two_processes_has_the_same_bytes(tmp_path: Path) -> None:
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-c", WRITE, str(tmp_path / f"{name}.safetensors")], check=True, timeout=120)
    one, two = (tmp_path / "one.safetensors").read_bytes(), (tmp_path / "two.safetensors").read_bytes()
    assert one == two
    length = int.from_bytes(one[:8], "little")
    header = json.loads(one[8 : 8 + length])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    tensors = load_file(tmp_path / "one.safetensors")  # still a valid file, read by safetensors itself
    assert len(tensors) == 18 and torch.equal(
        tensors["transformer.blocks.2.attn.to_v.lora_B.weight"], torch.full((4, 4), 2.0)
    )
    with safe_open(tmp_path / "one.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()["dittune_lora"])["extra"] == {"a": [2, 3], "b": 1}
