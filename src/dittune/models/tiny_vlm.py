"""A tiny random LLaVA (CLIP vision tower + Llama) for testing `dittune caption` offline.

The folder holds what a real image-text-to-text checkpoint holds: `config.json` and weights for
`AutoModelForImageTextToText`, and a processor (CLIP image processor, a byte-fallback BPE Llama tokenizer
built like `hunyuan_video.llama_tokenizer`'s, a chat template) for `AutoProcessor`. Nothing is downloaded.

Random weights would often end generation at once (EOS) or emit only special or byte-fallback tokens,
which decode to nothing, so `generation_config.json` suppresses those tokens: greedy generation then
always writes `max_new_tokens` visible pieces. Real models need none of this.
"""

from __future__ import annotations

from pathlib import Path

from dittune.models.hunyuan_video.llama_tokenizer import llama_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
"""16 image tokens per picture (4×4 patches; the CLS token is dropped by the "default" strategy)."""
VISION_INIT_FACTOR, TEXT_INIT_RANGE = 10.0, 0.2
"""Ten times the usual initial weights, so that the picture, not only the prompt, decides the random caption."""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""LLaVA-1.5 style: "USER: <image>\\nText\\nASSISTANT:"."""

_MERGE_TEXT = (
    "USER: ASSISTANT: Describe this image in one sentence. Describe the subject, appearance, action, "
    "setting, style, lighting and composition in one paragraph. Answer in English. 用中文描述这张图片。"
)
"""Text the tokenizer learns merges on (besides `caption_corpus()`), so prompts tokenize compactly."""


def build_tiny_vlm(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA folder at `out_dir` (created; must be empty if it exists); returns it."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new folder for the tiny VLM")
    tokenizer = llama_tokenizer(_MERGE_TEXT, "left", 512, {"image_token": IMAGE_TOKEN})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=32,
            initializer_factor=VISION_INIT_FACTOR,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            initializer_range=TEXT_INIT_RANGE,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=_invisible_token_ids(tokenizer),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _invisible_token_ids(tokenizer) -> list[int]:
    """Special tokens, byte-fallback tokens and whitespace-only tokens: what a caption must not be made of."""
    ids = set(tokenizer.all_special_ids)
    for token, index in tokenizer.get_vocab().items():
        if token.startswith("<0x") or not token.replace("▁", "").strip():
            ids.add(index)
    return sorted(ids)
