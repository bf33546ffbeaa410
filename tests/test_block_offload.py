"""`train.blocks_to_swap`: the frozen weights of the first K transformer blocks on a storage device, brought to the
training device per block (`dittune.models.block_offload`), for any family through `ModelSpec.transformer_blocks`.

On a CPU both sides are the CPU, but every fetch still makes a fresh copy, so the tests can see what is on the
"device": the order of fetches and releases, how many blocks are resident at once, and — through weak references
to every copy — that nothing (autograd included) keeps a released copy alive. Tiny real models (Flux: two block
lists; Wan: video; Hunyuan-DiT: dittune's own checkpointing), made 4 blocks deep per list, LoRA, fp32: the
gradients must equal those of the run without offloading.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from conftest import write_config
from dittune.cli.main import main
from dittune.config.errors import ConfigError
from dittune.config.load import load_config, validate_config
from dittune.models.base import ModelSpec, TrainBatch
from dittune.models.block_offload import BlockOffload, applied_offload, offload_blocks
from dittune.models.checkpointing import disable_block_checkpointing, is_checkpointing
from dittune.train.preflight import preflight
from family_batches import SpecCases, deeper_lora_denoiser, encoded_batch

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4
"""Blocks per block list (Flux: 4 double- and 4 single-stream blocks)."""


class Case:
    """A family's tiny pipeline, a deeper LoRA denoiser built from its transformer config, and one batch."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.scheduler = spec.load_scheduler()
        self.batch = _batch(spec)
        self.model = _lora_denoiser(spec)
        self.reference = self.step(self.fresh())

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def loss(self, model: nn.Module) -> torch.Tensor:
        draws = torch.Generator().manual_seed(7)
        return self.spec.compute_loss(model, self.scheduler, self.batch, draws, self.spec.default_loss_settings("lora"))

    def step(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = self.loss(model)
        out.loss.backward()
        return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _batch(spec: ModelSpec, size: int = 32) -> TrainBatch:
    return encoded_batch(spec, size)


def _lora_denoiser(spec: ModelSpec) -> nn.Module:
    return deeper_lora_denoiser(spec, LAYERS)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """family → `Case`, built on first use."""
    return SpecCases(tmp_path_factory.mktemp("offload-models"), Case)


class Watch:
    """Every event of an offload, and a weak reference to the memory of every device copy it made, by block (to
    the storage: a view, such as the transposed weight a Linear keeps for backward, keeps it alive too)."""

    def __init__(self, offload: BlockOffload) -> None:
        self.offload = offload
        self.events: list[tuple[str, int]] = []
        self.copies: dict[int, list[StorageWeakRef]] = {}
        self.most_resident = 0
        self.held: list[int] = []
        """Blocks whose copy was still referenced (e.g. kept by autograd) when it was released."""
        offload.observer = self

    def __call__(self, event: str, index: int) -> None:
        self.events.append((event, index))
        self.most_resident = max(self.most_resident, len(self.offload.resident))
        if event == "fetch":
            storages = [StorageWeakRef(t.untyped_storage()) for t in self.offload.copies[index].tensors]
            self.copies[index] = self.copies.get(index, []) + storages
        if event == "release" and index in self.alive():
            self.held.append(index)

    def alive(self) -> set[int]:
        """Blocks with a device copy whose memory something still references."""
        return {index for index, refs in self.copies.items() if any(not ref.expired() for ref in refs)}


def expected_events(count: int, training: bool, prefetch: bool = True) -> list[tuple[str, int]]:
    """The offload's events for one forward (and, training, its backward) of `count` swapped blocks."""
    events: list[tuple[str, int]] = []
    for index in range(count):
        if index == 0 or not prefetch:
            events.append(("fetch", index))
        if prefetch and index + 1 < count:
            events.append(("fetch", index + 1))  # prefetched while `index` runs
        events.append(("forward", index))
        if not (training and index == count - 1):  # the backward starts with the last one
            events.append(("release", index))
    if training:
        for index in reversed(range(count)):
            if index + 1 < count:
                events.append(("release", index + 1))  # its backward is done
                if not prefetch:
                    events.append(("fetch", index))
            if prefetch and index > 0:
                events.append(("fetch", index - 1))
            events.append(("recompute", index))
        events.append(("release", 0))  # at the end of the backward
    return events


def stored_on_the_storage(offload: BlockOffload) -> bool:
    """Every swapped parameter points at its stored tensor again."""
    return all(param.data.data_ptr() == home.data_ptr() for params in offload.params for param, home in params)


def assert_same(got: tuple[torch.Tensor, dict[str, torch.Tensor]], want: tuple[torch.Tensor, dict]) -> None:
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys() and got[1]
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name


# ------------------------------------------------------------------------------------------ training steps
@pytest.mark.parametrize(
    ("family", "checkpointing"), [("flux", "off"), ("flux", "all"), ("wan", "off"), ("wan", "all")]
)
def test_a_swapped_step_has_the_same_gradients_and_swaps_in_order(
    cases: dict[str, Case], family: str, checkpointing: str
) -> None:
    """ "off": the swapped blocks get dittune's checkpointing; "all": diffusers' switch recomputes them."""
    case = cases[family]
    model = case.fresh()
    if checkpointing == "all":
        case.spec.enable_partial_checkpointing(model, 1.0)
        assert model.gradient_checkpointing is True
    blocks = case.spec.transformer_blocks(model)
    count = len(blocks) - 1  # Flux: every double-stream block and all but one single-stream block
    offload = offload_blocks(case.spec, model, count, device="cpu")
    watch = Watch(offload)
    assert [is_checkpointing(b) for b in blocks] == [checkpointing == "off"] * count + [False]

    model.zero_grad(set_to_none=True)
    out = case.loss(model)
    assert offload.resident == {count - 1}, "after the forward only the block the backward starts with"
    assert watch.alive() == {count - 1}, "autograd keeps no swapped weight from the forward"
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert_same((out.loss.detach(), grads), case.reference)

    assert watch.events == expected_events(count, training=True)
    assert watch.held == [], "each release frees the copy at once: nothing, not even the backward, still uses it"
    assert watch.most_resident == 2 and offload.peak_resident == 2
    assert offload.resident == set() and watch.alive() == set(), "every copy is freed after the backward"
    assert stored_on_the_storage(offload)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_own_checkpointing_and_a_second_step(cases: dict[str, Case]) -> None:
    """Hunyuan-DiT checkpoints with dittune's own wrapper: the offload goes under it; a second step repeats."""
    case = cases["hunyuan-dit"]
    model = case.fresh()
    case.spec.enable_partial_checkpointing(model, 1.0)
    blocks = case.spec.transformer_blocks(model)
    offload = offload_blocks(case.spec, model, 2, device="cpu")
    assert all(is_checkpointing(b) for b in blocks)
    watch = Watch(offload)
    for _ in range(2):
        assert_same(case.step(model), case.reference)
        assert watch.events == expected_events(2, training=True)
        watch.events.clear()
    assert offload.fetches == 2 * (2 * 2 - 1) and watch.alive() == set()


def test_without_recomputation_autograd_would_keep_the_weights(cases: dict[str, Case]) -> None:
    """The control of the liveness check above: a swapped block that is not recomputed keeps its copy alive
    through autograd (on a GPU its memory would stay taken, or the backward would read stored weights). The
    offload refuses such a forward when no saved-tensor hooks are active; hooks that keep everything pass it."""
    case = cases["wan"]
    model = case.fresh()
    offload = offload_blocks(case.spec, model, 3, device="cpu")
    disable_block_checkpointing(case.spec.transformer_blocks(model))
    with pytest.raises(RuntimeError, match="swapped block 0 ran with autograd on outside a checkpoint"):
        case.loss(model)
    watch = Watch(offload)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # hooks that keep every tensor pass it
        out = case.loss(model)
    assert offload.resident == {2} and watch.alive() == {0, 1, 2} and watch.held == [0, 1]
    out.loss.backward()


@pytest.mark.parametrize("storage", ["default", "fp8_e4m3"])
def test_the_backward_never_reads_a_released_weight(cases: dict[str, Case], storage: str) -> None:
    """A backward node may keep a frozen parameter itself (fp8 storage's upcasting Linear does), which a release
    points back at the stored tensor. Each block's stored weights are overwritten with NaN once the backward has
    fetched them for the last time in the step (at its recomputation): a node reading a released weight would
    make the gradients NaN."""
    from dittune.models.storage import apply_base_storage

    case = cases["hunyuan-dit"]

    def model() -> nn.Module:
        fresh = case.fresh()
        apply_base_storage(fresh, storage, compute_dtype=torch.float32, spec_patterns=case.spec.storage_skip_patterns)
        return fresh

    want = case.step(model())
    swapped = model()
    offload = offload_blocks(case.spec, swapped, 3, device="cpu")

    def poison(event: str, index: int) -> None:
        if event == "recompute":
            for _, stored in offload.params[index]:
                stored.view(torch.uint8).fill_(0xFF)  # NaN in every float format

    offload.observer = poison
    got = case.step(swapped)
    assert_same(got, want)
    poisoned = [param for param, _ in offload.params[0]]
    assert any(param.dtype == torch.float8_e4m3fn for param in poisoned) == (storage == "fp8_e4m3")
    assert all(param.isnan().all() for param in poisoned if param.dtype.is_floating_point)


def test_without_prefetch_one_block_at_a_time(cases: dict[str, Case]) -> None:
    case = cases["flux"]
    model = case.fresh()
    offload = offload_blocks(case.spec, model, 5, device="cpu", prefetch=False)
    watch = Watch(offload)
    assert_same(case.step(model), case.reference)
    assert watch.events == expected_events(5, training=True, prefetch=False)
    assert offload.peak_resident == 1 and watch.alive() == set()


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_an_eval_forward_is_unchanged_and_leaves_nothing_on_the_device(cases: dict[str, Case], family: str) -> None:
    """Validation and sampling run the denoiser in eval mode without grad: same output, every copy released."""
    case = cases[family]
    plain = case.fresh().eval()
    model = case.fresh()
    count = len(case.spec.transformer_blocks(model))
    offload = offload_blocks(case.spec, model, count, device="cpu")
    model.eval()
    watch = Watch(offload)
    with torch.no_grad():
        want, got = case.loss(plain).loss, case.loss(model).loss
    assert torch.equal(got, want)
    assert watch.events == expected_events(count, training=False)
    assert offload.resident == set() and watch.alive() == set()
    with pytest.raises(RuntimeError, match="eval mode, where it is not recomputed"):
        case.loss(model)


# ------------------------------------------------------------------------------------------ placement
def test_moving_the_denoiser_leaves_the_swapped_weights_stored(cases: dict[str, Case]) -> None:
    """`denoiser.to(device)` (build_run, accelerate's prepare) must not bring the swapped weights to the device."""
    case = cases["flux"]
    model = case.fresh()
    blocks = case.spec.transformer_blocks(model)
    offload = offload_blocks(case.spec, model, 3, device="cpu")
    swapped = {id(p) for b in blocks[:3] for p in b.parameters() if not p.requires_grad}
    model.to("meta")
    for name, param in model.named_parameters():
        assert param.device.type == ("cpu" if id(param) in swapped else "meta"), name
    assert stored_on_the_storage(offload)
    names = {name for name, p in model.named_parameters() if id(p) in swapped}
    assert set(model._ddp_params_and_buffers_to_ignore) == names  # DDP neither broadcasts nor checks them
    assert all(".lora_" not in name and name.startswith("transformer_blocks.") for name in names)
    assert applied_offload(model) is offload and "3 of 8 blocks" in offload.line()


def test_more_blocks_than_the_model_has_is_refused(cases: dict[str, Case]) -> None:
    case = cases["flux"]
    with pytest.raises(ValueError, match=r"blocks_to_swap = 9, but FluxTransformer2DModel has only 8 transformer"):
        offload_blocks(case.spec, case.fresh(), 9, device="cpu")


def test_with_compile(cases: dict[str, Case]) -> None:
    """As `build_run` orders them: checkpoint, compile every block (aot_eager: AOTAutograd's graphs without C++
    code), then swap; the offload wrapper sits between the checkpoint and the compiled forward."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from dittune.models.compile import compile_blocks, is_compiled

    case = cases["hunyuan-dit"]
    model = case.fresh()
    case.spec.enable_partial_checkpointing(model, 0.5)
    torch._dynamo.reset()
    try:
        compile_blocks(case.spec, model, backend="aot_eager")
        offload = offload_blocks(case.spec, model, 3, device="cpu")
        blocks = case.spec.transformer_blocks(model)
        assert all(is_compiled(b) for b in blocks) and [is_checkpointing(b) for b in blocks] == [1, 1, 1, 0]
        watch = Watch(offload)
        graphs = []
        for _ in range(2):  # the second step runs the cached graphs on new copies, without compiling again
            loss, grads = case.step(model)
            graphs.append(counters["stats"]["unique_graphs"])
            torch.testing.assert_close(loss, case.reference[0], rtol=1e-5, atol=1e-6)
            for name, grad in case.reference[1].items():
                torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
            assert watch.events == expected_events(3, training=True)
            watch.events.clear()
        assert graphs[0] == graphs[1] > 0
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ config and runs
BASE = {
    "output_dir": "/tmp/out",
    "model": {"family": "sd3", "path": "/tmp/model"},
    "data": {"path": "/tmp/data", "resolution": 64, "resolution_type": "pixel"},
}


def test_the_key_and_its_checks(tmp_path: Path, tiny_models: dict[str, Path], dataset: Path) -> None:
    assert validate_config({**BASE, "train": {"max_steps": 1}}).train.blocks_to_swap == 0
    with pytest.raises(ConfigError, match="blocks_to_swap"):
        validate_config({**BASE, "train": {"max_steps": 1, "blocks_to_swap": -1}})
    path = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, tmp_path / "run", blocks_to_swap=2)
    assert preflight(load_config(path)) == []
    (key, message), *more = preflight(load_config(path, ["train.method=full"]))
    assert key == "train.blocks_to_swap" and "LoRA runs" in message and not more
    (key, message), *_ = preflight(load_config(path, ["model.base_storage=nf4"]))
    assert key == "train.blocks_to_swap" and "bitsandbytes" in message


def _pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))]


def test_a_run_with_swapped_blocks_trains_validates_and_resumes_exactly(
    tmp_path: Path, tiny_models: dict[str, Path], dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dittune train` with 3 of the 4 blocks swapped: the same LoRA and validation images as without (both
    recompute every block), and a crash after step 2 plus `--resume latest` ends bit-identical."""
    extra = '[checkpoint]\nevery_steps = 2\nkeep_last = 5\n[validation]\nprompts = ["a red circle"]\nsteps = 2\n'
    settings = dict(gradient_checkpointing=True, learning_rate=1e-3)
    model = tiny_models["v1.2"]
    plain = write_config(tmp_path / "plain.toml", model, dataset, tmp_path / "plain", extra, **settings)
    assert main(["train", str(plain)]) == 0
    capsys.readouterr()
    swapped = tmp_path / "swapped"
    cfg = write_config(tmp_path / "cfg.toml", model, dataset, swapped, extra, blocks_to_swap=3, **settings)
    assert main(["train", str(cfg), "--set", f"cache.dir={tmp_path / 'plain' / 'cache'}"]) == 0
    printed = capsys.readouterr().out
    assert "Offload    3 of 4 blocks' frozen weights" in printed and "no memory saved" in printed

    a, b = (
        load_file(tmp_path / "plain" / "final" / "lora.safetensors"),
        load_file(swapped / "final" / "lora.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    want, got = _pixels(tmp_path / "plain" / "validation"), _pixels(swapped / "validation")
    assert len(got) == len(want) >= 2 and all(np.array_equal(x, y) for x, y in zip(got, want))

    crashed = tmp_path / "crashed"
    shutil.copytree(swapped / "checkpoints" / "step_00000002", crashed / "checkpoints" / "step_00000002")
    args = ["train", str(cfg), "--set", f"output_dir={crashed}", "--set", f"cache.dir={tmp_path / 'plain' / 'cache'}"]
    assert main([*args, "--resume", "latest"]) == 0
    c = load_file(crashed / "final" / "lora.safetensors")
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)


def test_a_run_refuses_more_blocks_than_the_model_has(
    tmp_path: Path, tiny_models: dict[str, Path], dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "cfg.toml", tiny_models["v1.2"], dataset, tmp_path / "run", blocks_to_swap=5)
    assert main(["train", str(cfg)]) != 0
    assert "train.blocks_to_swap = 5, but HunyuanDiT2DModel has only 4 transformer blocks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the benchmark
def test_the_benchmark_refuses_without_cuda_and_times_the_overhead_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import block_offload_gpu

    if not torch.cuda.is_available():
        assert block_offload_gpu.main([]) == 2
        assert "error: no CUDA GPU" in capsys.readouterr().err
    out = tmp_path / "offload.md"
    arguments = ["--device", "cpu", "--double", "1", "--single", "1", "--size", "32", "--steps", "2", "--warmup", "0"]
    assert block_offload_gpu.main([*arguments, "--write", str(out)]) == 0
    text = out.read_text()
    assert "no memory is saved and none is shown" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row[0] for row in rows] == ["| 0", "| 1", "| 2"] and rows[0][2] == "1.000 |"
