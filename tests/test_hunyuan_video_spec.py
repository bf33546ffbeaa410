"""HunyuanVideo (T2V) against diffusers itself: the offline Llama tokenizer and its template crop, prompt
encoding, the flow convention, the guidance input, LoRA targets and sampling from cached embeddings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dittune.models.base import SampleMeta, TrainBatch
from dittune.models.hunyuan_video.spec import HunyuanVideoSpec, prompt_template
from dittune.models.hunyuan_video.tiny import build_tiny_hunyuan_video

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle on a blue background", "", "随机生成一张图片"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("hunyuan-video") / "t2v", seed=0)


@pytest.fixture(scope="module")
def spec(model: Path) -> HunyuanVideoSpec:
    return HunyuanVideoSpec(model)


@pytest.fixture(scope="module")
def stock(model: Path):
    from diffusers import HunyuanVideoPipeline

    pipeline = HunyuanVideoPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def embeddings(spec: HunyuanVideoSpec) -> list[dict[str, torch.Tensor]]:
    return spec.encode_prompts(spec.load_text_encoders(CPU, torch.float32), PROMPTS)


def _batched(embedding: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.unsqueeze(0) for key, value in embedding.items()}


def test_facts_need_no_torch_and_name_the_real_parts(spec: HunyuanVideoSpec) -> None:
    code = "import sys, dittune.models.registry as r; r.facts_class('hunyuan-video'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    assert spec.check_folder(spec.path) == []
    denoiser = spec.load_denoiser(torch.float32, random_init=True)
    assert len(spec.transformer_blocks(denoiser)) == 2  # one double-stream, one single-stream block
    assert spec.frame_rule.valid(9) and not spec.frame_rule.valid(8)
    assert "shifted by 7" in spec.describe_objective(spec.default_loss_settings("lora"))


def test_the_llama_tokenizer_is_built_offline_and_the_crop_removes_exactly_the_template(
    spec: HunyuanVideoSpec, tmp_path: Path
) -> None:
    """The template before the prompt is `crop_start` tokens (BOS included), as with the real Llama 3
    tokenizer, so the cropped sequence starts at the prompt; the build is deterministic."""
    from transformers import LlamaTokenizerFast

    from dittune.models.hunyuan_video.llama_tokenizer import write_llama_tokenizer

    template = prompt_template()
    tokenizer = LlamaTokenizerFast.from_pretrained(spec.path / "tokenizer")
    prefix = tokenizer(template["template"].split("{}")[0]).input_ids
    assert len(prefix) == template["crop_start"] == 95 and prefix[0] == tokenizer.bos_token_id
    for prompt in PROMPTS[::2]:
        tokens = tokenizer(template["template"].format(prompt), max_length=95 + 24, padding="max_length").input_ids
        kept = tokens[95:]
        assert tokenizer.unk_token_id not in kept
        assert tokenizer.decode(kept, skip_special_tokens=True) == prompt
        assert kept[-1] == tokenizer.pad_token_id  # padded on the right: the crop never eats padding
    write_llama_tokenizer(tmp_path / "again", template["template"])
    rebuilt, shipped = (folder / "tokenizer.json" for folder in (tmp_path / "again", spec.path / "tokenizer"))
    assert rebuilt.read_bytes() == shipped.read_bytes()


def test_prompt_embeddings_match_the_stock_encode_prompt(spec: HunyuanVideoSpec, stock, embeddings) -> None:
    ours = spec.load_pipeline(torch.float32)  # `dittune sample`'s pipeline: the tokenizer via AutoTokenizer
    with torch.no_grad():
        for a, b in zip(ours.encode_prompt(PROMPTS[0]), stock.encode_prompt(PROMPTS[0])):
            assert torch.equal(a, b)
    for prompt, embedding in zip(PROMPTS, embeddings):
        with torch.no_grad():
            embeds, pooled, mask = stock.encode_prompt(prompt)
        batch = _batched(embedding)
        assert torch.equal(batch["llama_embeds"], embeds) and torch.equal(batch["clip_pooled"], pooled)
        assert torch.equal(batch["llama_mask"], mask) and mask.shape == (1, 256)
        assert (int(mask.sum()) == 1) == (prompt == "")  # the empty prompt keeps only <|eot_id|>


def test_a_byte_level_llama_3_tokenizer_is_loaded_intact(tmp_path: Path) -> None:
    """The released checkpoint ships a byte-level tokenizer declared as PreTrainedTokenizerFast; the spec
    loads it as declared, so spaces survive (transformers 5's LlamaTokenizerFast would rebuild it)."""
    import json

    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    folder = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    tokenizer = HunyuanVideoSpec(tmp_path).load_tokenizer()
    assert tokenizer.decode(tokenizer("a red ball, rolling").input_ids) == "a red ball, rolling"


def test_the_text_identity_names_the_template_crop_and_lengths(spec: HunyuanVideoSpec) -> None:
    from dittune.fingerprint import Fingerprinter

    identity = spec.text_identity(Fingerprinter())
    assert identity["template"] == prompt_template()["template"] and identity["crop_start"] == 95
    assert identity["max_length"] == [256, 77]
    assert {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"} <= set(identity)


def test_clips_encode_to_moments_and_scaled_latents(spec: HunyuanVideoSpec) -> None:
    vae = spec.load_vae(CPU, torch.float32)
    pixels = torch.rand(2, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    moments = spec.encode_pixels(vae, pixels)
    assert len(moments) == 2 and moments[0]["mean"].shape == (4, 3, 8, 8) == moments[0]["logvar"].shape
    batched = {key: torch.stack([m[key] for m in moments]) for key in moments[0]}
    x0 = spec.latents_from_moments(batched, torch.Generator().manual_seed(0), sample=False)
    torch.testing.assert_close(x0, batched["mean"] * 0.476986)
    with pytest.raises(ValueError, match="4k\\+1"):
        spec.encode_pixels(vae, pixels[:, :, :8])


class ExactVelocity(torch.nn.Module):
    """Stands in for the transformer: returns noise − x0 = (x_σ − x0)/σ, reading σ from `timestep`/1000."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs) -> tuple[torch.Tensor]:
        self.calls.append({"timestep": timestep, **kwargs})
        sigma = (timestep / 1000.0).reshape(-1, 1, 1, 1, 1)
        return ((hidden_states - self.x0) / sigma,)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.95])
def test_x0_is_recovered_from_the_exact_velocity(spec: HunyuanVideoSpec, embeddings, sigma: float) -> None:
    from dittune.models import flow_objective as flow

    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(1, 4, 3, 8, 8, generator=generator) for _ in range(2))
    sigmas = torch.tensor([sigma])
    x_t = flow.noisy_latents(x0, noise, sigmas)
    velocity = spec.forward(ExactVelocity(x0), x_t, sigmas, _batched(embeddings[0]))
    torch.testing.assert_close(velocity, noise - x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, velocity, sigmas), x0, rtol=1e-5, atol=1e-5)


def test_the_training_loss_vanishes_for_the_exact_velocity(spec: HunyuanVideoSpec, embeddings) -> None:
    """compute_loss scales the cached latents, draws σ with the scheduler's shift and targets noise − x0."""
    from dittune.models import flow_objective as flow

    mean = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    denoiser = ExactVelocity(mean * 0.476986)
    text = {key: torch.stack([embeddings[0][key], embeddings[1][key]]) for key in embeddings[0]}
    meta = [SampleMeta((64, 64), (64, 64), (0, 0), frames=9)] * 2
    batch = TrainBatch(moments={"mean": mean, "logvar": torch.full_like(mean, -30.0)}, text=text, meta=meta)
    settings = spec.default_loss_settings("lora")
    settings.sample_latents = False
    out = spec.compute_loss(denoiser, spec.load_scheduler(), batch, torch.Generator().manual_seed(2), settings)
    assert out.loss.item() < 1e-8 and set(out.logs) == {"loss_mse", "sigma_mean"}
    assert all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())
    # σ: uniform draws shifted by the scheduler's 7, as the sampler spaces them; timestep = 1000·σ
    expected = flow.shift_sigmas(torch.rand(2, generator=torch.Generator().manual_seed(2)), 7.0)
    torch.testing.assert_close(denoiser.calls[0]["timestep"], expected * 1000.0)
    assert torch.equal(denoiser.calls[0]["guidance"], torch.tensor([1000.0, 1000.0]))  # loss.guidance 1.0


def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(spec: HunyuanVideoSpec, embeddings) -> None:
    """The guidance embedding input is guidance × 1000 in both; with the pipeline's first-step latents and σ,
    the spec's forward reproduces the transformer output the pipeline got."""
    denoiser = spec.load_denoiser(torch.float32)
    seen: list[tuple[dict, torch.Tensor]] = []
    denoiser.register_forward_hook(lambda _m, _a, kwargs, out: seen.append((kwargs, out[0])), with_kwargs=True)
    pipeline = spec.build_pipeline(denoiser, spec.load_vae(CPU, torch.float32), spec.load_scheduler())
    kwargs = spec.pipeline_kwargs(
        embeddings[0], embeddings[1], width=64, height=64, steps=1, guidance=6.0,
        generator=torch.Generator().manual_seed(0), frames=9,
    )  # fmt: skip
    pipeline(**kwargs, output_type="latent")
    (stock_inputs, stock_output) = seen.pop()
    sigmas = stock_inputs["timestep"] / 1000.0
    with torch.no_grad():
        ours = spec.forward(denoiser, stock_inputs["hidden_states"], sigmas, _batched(embeddings[0]), guidance=6.0)
    (train_inputs, _) = seen.pop()
    assert torch.equal(train_inputs["guidance"], stock_inputs["guidance"])
    assert torch.equal(stock_inputs["guidance"], torch.tensor([6000.0]))
    for key in ("timestep", "encoder_attention_mask", "pooled_projections", "encoder_hidden_states"):
        assert torch.equal(train_inputs[key], stock_inputs[key]), key
        assert train_inputs[key].dtype == stock_inputs[key].dtype, key
    torch.testing.assert_close(ours, stock_output, rtol=0, atol=0)
    assert ours.shape == (1, 4, 3, 8, 8)


def test_a_lora_with_the_default_targets_loads_into_the_stock_pipeline(spec: HunyuanVideoSpec, stock, tmp_path) -> None:
    """Every default target exists in both block kinds, and diffusers' loader takes our file as trained."""
    from dittune.export.lora_file import LoraInfo, save_lora
    from dittune.models.lora import inject_lora, lora_state_dict

    denoiser = spec.load_denoiser(torch.float32)
    names = inject_lora(denoiser, rank=2, alpha=2.0, targets=spec.default_lora_targets)
    for target in ("attn.to_q", "attn.add_q_proj", "attn.to_add_out", "attn.to_out.0"):
        assert f"transformer_blocks.0.{target}" in names
    assert {f"single_transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")} <= set(names)
    generator = torch.Generator().manual_seed(3)
    for name, param in denoiser.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    info = LoraInfo("hunyuan-video", "transformer", 2, 2.0, list(spec.default_lora_targets))
    stock.load_lora_weights(str(save_lora(tmp_path / "lora.safetensors", lora_state_dict(denoiser), info)))
    inputs = {
        "hidden_states": torch.randn(1, 4, 1, 8, 8, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
        "encoder_attention_mask": torch.ones(1, 6),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "guidance": torch.tensor([1000.0]),
        "return_dict": False,
    }
    try:
        with torch.no_grad():
            torch.testing.assert_close(stock.transformer(**inputs)[0], denoiser(**inputs)[0])
    finally:
        stock.unload_lora_weights()


def test_sampling_from_cached_embeddings_equals_the_stock_pipeline(spec: HunyuanVideoSpec, stock, embeddings) -> None:
    """9 frames at 64×64, 2 steps: the validation path (cached embeddings) and the text path agree."""
    negative = embeddings[1]
    pipeline = spec.build_pipeline(
        spec.load_denoiser(torch.float32), spec.load_vae(CPU, torch.float32), spec.load_scheduler()
    )
    common = {"width": 64, "height": 64, "frames": 9, "fps": 24.0}
    ours = pipeline(
        **spec.pipeline_kwargs(
            embeddings[0], negative, steps=2, guidance=6.0, generator=torch.Generator().manual_seed(0), **common
        ),
        output_type="np",
    ).frames
    reference = stock(
        **spec.prompt_kwargs(PROMPTS[0], PROMPTS[1], **common),
        num_inference_steps=2,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    assert ours.shape == (1, 9, 64, 64, 3)
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(reference))
    frames = spec.output_frames(pipeline(**spec.pipeline_kwargs(
        embeddings[0], negative, steps=1, guidance=6.0, generator=torch.Generator().manual_seed(0), **common
    )))  # fmt: skip
    assert len(frames) == 9 and frames[0].size == (64, 64)
    latents = pipeline(
        **spec.pipeline_kwargs(
            embeddings[0], negative, steps=1, guidance=6.0, generator=torch.Generator().manual_seed(0), **common
        ),
        output_type="latent",
    ).frames
    assert spec.pipeline_latents(latents, 64, 64, 9).shape == (1, 4, 3, 8, 8)
