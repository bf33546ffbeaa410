"""scripts/build_demo_base.py end to end at toy sizes: every stage runs, the install is complete, re-runs skip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_base.py"


@pytest.mark.slow
def test_build_script_runs_every_stage_and_installs(tmp_path: Path) -> None:
    work, target = tmp_path / "work", tmp_path / "base"
    command = [sys.executable, str(SCRIPT), str(work), "--images", "40", "--vae-steps", "2", "--steps", "2"]
    command += ["--eval-steps", "2"]  # plumbing only: the real evaluation is tests/test_demo_base.py
    subprocess.run([*command, "--install", str(target)], check=True, capture_output=True)

    card = (target / "README.md").read_text(encoding="utf-8")
    assert "build_demo_base.py WORK --install demo/base --images 40 --vae-steps 2 --steps 2 --eval-steps 2" in card
    assert "2 DDPM steps" in card
    build = json.loads((target / "build.json").read_text())
    assert build["steps"] == 2 and build["samples"] == 96 and 0 <= build["accuracy"] <= 1
    config = tomllib.loads((target / "base.toml").read_text(encoding="utf-8"))
    assert (config["train"]["init"], config["train"]["method"], config["train"]["max_steps"]) == ("random", "full", 2)
    assert (target / "heldout_grid.png").is_file()
    timings = json.loads((work / "timings.json").read_text())
    assert set(timings) == {"data", "vae", "components", "transformer", "evaluation"}

    # the installed transformer is the run's export, trained from a fresh init, not the components' weights
    name = "diffusion_pytorch_model.safetensors"
    installed = load_file(target / "transformer" / name)
    assert all(
        torch.equal(installed[k], v) for k, v in load_file(work / "run" / "final" / "transformer" / name).items()
    )
    assert any(
        not torch.equal(installed[k], v) for k, v in load_file(work / "components" / "transformer" / name).items()
    )
    vae_scale = json.loads((target / "vae" / "config.json").read_text())["scaling_factor"]
    assert vae_scale == json.loads((work / "vae_stats.json").read_text())["scaling_factor"]

    # a second run finds every stage done and retrains nothing
    stamp = (work / "run" / "final" / "transformer" / name).stat().st_mtime_ns
    rerun = subprocess.run(command, check=True, capture_output=True, text=True)
    assert "Training the" not in rerun.stdout
    assert (work / "run" / "final" / "transformer" / name).stat().st_mtime_ns == stamp
