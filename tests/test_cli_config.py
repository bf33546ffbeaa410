"""The `dittune` command line, run in-process (plus two subprocess runs for the entry point)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dittune.cli.main import main
from dittune.config import config_reference_markdown, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

GOOD = """\
output_dir = "out"

[model]
family = "hunyuan-dit"
path = "model"

[data]
path = "images"
resolution = 512
resolution_type = "pixel"

[train]
max_steps = 7
"""
BAD = GOOD.replace("max_steps = 7", 'max_steps = "seven"\nbatch_sise = 2')


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with model/ and images/ folders (one captioned image) and good.toml / bad.toml configs."""
    from PIL import Image

    (tmp_path / "model").mkdir()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "images" / "red.png")
    (tmp_path / "images" / "red.txt").write_text("a red square", encoding="utf-8")
    (tmp_path / "good.toml").write_text(GOOD, encoding="utf-8")
    (tmp_path / "bad.toml").write_text(BAD, encoding="utf-8")
    return tmp_path


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_config_check_ok(project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    seen = []
    fake_module(monkeypatch, "dittune.train.preflight", preflight=lambda cfg: seen.append(cfg) or [])
    assert main(["config", "check", str(project / "good.toml")]) == 0
    out = capsys.readouterr().out
    assert f"config OK: {project / 'good.toml'}" in out
    assert "family=hunyuan-dit method=lora max_steps=7" in out
    assert seen[0].data.path == project / "images"


def test_config_check_reports_preflight_problems(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    found = [("model.path", "no model_index.json"), ("data.path", "no images")]
    fake_module(monkeypatch, "dittune.train.preflight", preflight=lambda cfg: found)
    assert main(["config", "check", str(project / "good.toml")]) == 1
    captured = capsys.readouterr()
    assert "model.path: no model_index.json" in captured.err
    assert "data.path: no images" in captured.err
    assert "config OK" not in captured.out


def test_config_check_without_preflight_module(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "dittune.train.preflight", None)  # import raises ImportError
    assert main(["config", "check", str(project / "good.toml"), "--set", "train.max_steps=3"]) == 0
    assert "max_steps=3" in capsys.readouterr().out


def test_config_check_bad_config(project: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "check", str(project / "bad.toml")]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps: expected an integer, got 'seven' (str)" in err
    assert "train.batch_sise: unknown key. Did you mean 'batch_size'?" in err
    assert "Traceback" not in err


def test_bad_override_exits_2(project: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", str(project / "good.toml"), "--set", "nonsense"]) == 2
    assert "--set dotted.key=value" in capsys.readouterr().err


def test_missing_config_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file not found: {tmp_path / 'nope.toml'}"


def test_debug_env_reraises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DITTUNE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["config", "show", str(tmp_path / "nope.toml")])


def test_config_show_reparses(project: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", str(project / "good.toml"), "--set", "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    parsed = tomllib.loads(out)
    assert parsed["train"]["batch_size"] == 2
    assert parsed["train"]["max_steps"] == 7
    assert parsed["checkpoint"]["keep_last"] == 3
    shown = project / "shown" / "resolved.toml"
    shown.parent.mkdir()
    shown.write_text(out, encoding="utf-8")
    assert load_config(shown) == load_config(project / "good.toml", ["train.batch_size=2"])


def test_config_docs(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "docs"]) == 0
    assert capsys.readouterr().out == config_reference_markdown()


def test_version(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dittune ")


def test_usage_error_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["config"]) == 2
    assert main(["tiny", "no-such-family", "x"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_train_and_cache_call_the_runner(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    fake_module(
        monkeypatch,
        "dittune.train.runner",
        run_train=lambda cfg, resume, overwrite: calls.append(("train", cfg.train.max_steps, resume, overwrite)),
        run_cache=lambda cfg: calls.append(("cache", cfg.train.max_steps)),
    )
    config = str(project / "good.toml")
    assert main(["train", config, "--set", "train.max_steps=9", "--resume", "latest"]) == 0
    assert main(["train", config]) == 0
    assert main(["train", config, "--overwrite"]) == 0
    assert main(["cache", config]) == 0
    assert calls == [("train", 9, "latest", False), ("train", 7, None, False), ("train", 7, None, True), ("cache", 7)]


def test_sample_passes_every_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    fake_module(monkeypatch, "dittune.sample", run_sample=lambda **kw: calls.append(kw))
    assert main(["sample", "--model", "m", "--prompt", "a cat", "--out", "o.png"]) == 0
    assert calls[-1] == {
        "model": Path("m"),
        "lora": None,
        "lora_scale": 1.0,
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": 0,
        "steps": 30,
        "guidance": 5.0,
        "width": None,
        "height": None,
        "out": Path("o.png"),
        "family": None,
        "precision": "auto",
        "frames": None,
        "fps": None,
        "image": None,
        "low_vram": False,
    }
    argv = ["sample", "--model", "m", "--lora", "l.safetensors", "--prompt", "p", "--negative-prompt", "n"]
    argv += ["--seed", "3", "--steps", "4", "--guidance", "1.5", "--width", "64", "--height", "32"]
    argv += ["--out", "o.png", "--family", "hunyuan-dit", "--precision", "bf16"]
    assert main(argv) == 0
    assert calls[-1]["precision"] == "bf16"
    assert calls[-1]["lora"] == Path("l.safetensors")
    assert (calls[-1]["seed"], calls[-1]["steps"], calls[-1]["guidance"]) == (3, 4, 1.5)
    assert (calls[-1]["width"], calls[-1]["height"], calls[-1]["family"]) == (64, 32, "hunyuan-dit")
    assert main(["sample", "--model", "m", "--prompt", "p", "--out", "o.mp4", "--frames", "9", "--fps", "12"]) == 0
    assert (calls[-1]["frames"], calls[-1]["fps"], calls[-1]["out"]) == (9, 12.0, Path("o.mp4"))
    assert main(["sample", "--model", "m", "--prompt", "p", "--out", "o.gif", "--image", "first.png"]) == 0
    assert calls[-1]["image"] == Path("first.png")
    assert main(["sample", "--model", "m", "--prompt", "p", "--out", "o.png", "--low-vram"]) == 0
    assert calls[-1]["low_vram"] is True


def test_user_errors_from_handlers_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def refuse(**kwargs: object) -> None:
        raise FileExistsError("o.png exists")

    fake_module(monkeypatch, "dittune.sample", run_sample=refuse)
    assert main(["sample", "--model", "m", "--prompt", "p", "--out", "o.png"]) == 2
    assert capsys.readouterr().err == "error: o.png exists\n"


def test_keyboard_interrupt_exits_130(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(cfg: object) -> None:
        raise KeyboardInterrupt

    fake_module(monkeypatch, "dittune.train.runner", run_cache=interrupted)
    assert main(["cache", str(project / "good.toml")]) == 130


def test_tiny_calls_the_family_builder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls: list[tuple] = []

    def build(out_dir: Path, variant: str, seed: int) -> Path:
        calls.append((out_dir, variant, seed))
        return out_dir

    fake_module(monkeypatch, "dittune.models.hunyuan_dit.tiny", build_tiny_hunyuan_dit=build)
    assert main(["tiny", "hunyuan-dit", str(tmp_path / "a")]) == 0
    assert main(["tiny", "hunyuan-dit", str(tmp_path / "b"), "--variant", "v1.1", "--seed", "5"]) == 0
    assert calls == [(tmp_path / "a", "v1.2", 0), (tmp_path / "b", "v1.1", 5)]
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(["tiny", "hunyuan-dit", str(tmp_path / "c"), "--variant", "v9"]) == 2
    assert "unknown variant 'v9'" in capsys.readouterr().err


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("DITTUNE_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_python_dash_m_entry_point(project: Path) -> None:
    result = _run(["-m", "dittune", "config", "check", "bad.toml"], cwd=project)
    assert result.returncode == 2
    assert "train.batch_sise: unknown key. Did you mean 'batch_size'?" in result.stderr


def test_cli_import_does_not_load_heavy_libraries(project: Path) -> None:
    code = (
        "import sys\n"
        "from dittune.cli.main import main\n"
        "rc = main(['config', 'show', 'good.toml'])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc)\n"
    )
    result = _run(["-c", code], cwd=project)
    assert result.returncode == 0, result.stderr
    assert "HEAVY [] 0" in result.stdout


@pytest.mark.parametrize("family", ["hunyuan-dit", "sd3", "pixart-sigma", "flux"])
def test_config_check_runs_every_check_without_torch(
    tmp_path: Path, family_models: dict[str, Path], dataset: Path, family: str
) -> None:
    """`dittune config check` checks the model folder and family rules without importing torch."""
    from conftest import write_config

    good = write_config(tmp_path / "good.toml", family_models[family], dataset, tmp_path / "run", family=family)
    bad = write_config(tmp_path / "bad.toml", tmp_path, dataset, tmp_path / "run", family=family)
    bad.write_text(
        bad.read_text().replace('resolution_type = "pixel"\n', 'resolution_type = "pixel"\nbucket_step = 8\n')
    )
    code = (
        "import sys\n"
        "from dittune.cli.main import main\n"
        f"ok = main(['config', 'check', {str(good)!r}])\n"
        f"bad = main(['config', 'check', {str(bad)!r}])\n"
        "print('RESULT', ok, bad, 'torch' in sys.modules)\n"
    )
    result = _run(["-c", code], cwd=tmp_path)
    assert "RESULT 0 1 False" in result.stdout, result.stdout + result.stderr
    assert "model.path" in result.stderr and "data.bucket_step" in result.stderr
    assert "precision" not in result.stderr


def test_console_exit_skips_teardown_but_keeps_every_file(tmp_path: Path) -> None:
    """`python -m dittune` leaves through `os._exit` after `main`: what a command wrote must be complete."""
    from safetensors.torch import load_file

    from dittune.models.hunyuan_dit.spec import HunyuanDiTSpec

    result = _run(["-m", "dittune", "tiny", "hunyuan-dit", str(tmp_path / "m")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(str(tmp_path / "m"))  # stdout was flushed before the exit
    assert not HunyuanDiTSpec(tmp_path / "m").inspect().warnings
    weights = sorted((tmp_path / "m").rglob("*.safetensors"))
    assert len(weights) == 4 and all(load_file(path) for path in weights)


@pytest.mark.parametrize("case", ["ltx-video", "cogvideox@1.5", "hunyuan-video", "wan"])
def test_config_check_of_a_video_family_needs_no_torch_and_shows_the_clips(
    tmp_path: Path, video_models: dict[str, Path], dataset: Path, case: str
) -> None:
    from conftest import write_config

    family = case.partition("@")[0]
    config = write_config(tmp_path / "v.toml", video_models[case], dataset, tmp_path / "run", family=family)
    config.write_text(config.read_text().replace("[train]", "frames = 22\nfps = 12\n[train]", 1))
    code = (
        "import sys\n"
        "from dittune.cli.main import main\n"
        f"ok = main(['config', 'check', {str(config)!r}])\n"
        "print('RESULT', ok, 'torch' in sys.modules)\n"
    )
    result = _run(["-c", code], cwd=tmp_path)
    assert "RESULT 0 False" in result.stdout, result.stdout + result.stderr
    rule = {"ltx-video": (17, "8k+1"), "cogvideox": (17, "8k+1"), "hunyuan-video": (21, "4k+1"), "wan": (21, "4k+1")}
    frames, name = rule[family]
    assert f"clips: {frames} frames (data.frames 22 snapped down), {name} rule, at 12 fps" in result.stdout
