"""docs/formats.md's generated part: every family's original layout and LoRA formats, rendered from the code.

The tables come from the same `Layout` rules the converters run, so the documented key maps cannot drift from
what `dittune lora convert`, `dittune export` and single-file loading do. `scripts/update_readme.py` writes
them between the BEGIN and END markers; a test checks they are current.
"""

from __future__ import annotations

from dittune.models.layout import Fuse, Key, Layout, Rename
from dittune.models.registry import facts_class, family_names

BEGIN = "<!-- BEGIN GENERATED: layouts (python scripts/update_readme.py) -->"
END = "<!-- END GENERATED: layouts -->"
EXAMPLE = {
    "kohya": "lora_unet_{module with . → _}.lora_down/.lora_up/.alpha",
    "comfyui": "diffusion_model.{module}.lora_A/.lora_B/.alpha",
    "peft": "folder: adapter_config.json + base_model.model.{module}.lora_A/.lora_B",
}


def _rule_row(rule: Rename | Fuse | Key) -> str:
    if isinstance(rule, Fuse):
        parts = ", ".join(f"`{p}`" for p in rule.ours)
        ratios = f" rows {':'.join(map(str, rule.ratios))}" if rule.ratios else ""
        return f"| {parts} | `{rule.theirs}` | fused (rows stacked{ratios}); LoRA: A stacked, B block-diagonal |"
    if isinstance(rule, Key):
        return f"| `{rule.ours}` (tensor) | `{rule.theirs}` | renamed |"
    notes = []
    if rule.params:
        notes.append(", ".join(f"`{ours}` ↔ `{theirs}`" for ours, theirs in rule.params))
    if rule.swap_halves:
        when = f" (only where rows = {rule.swap_if_rows} × inputs)" if rule.swap_if_rows else ""
        notes.append(f"(shift, scale) halves of the rows swapped{when}")
    same = "same name" if rule.ours == rule.theirs else "renamed"
    return f"| `{rule.ours}` | `{rule.theirs}` | {'; '.join(notes) or same} |"


def _layout_table(layout: Layout) -> list[str]:
    lines = ["| diffusers module | original module | conversion |", "| --- | --- | --- |"]
    lines += [_rule_row(rule) for rule in layout.rules]
    prefixes = ", ".join(f"`{p}`" for p in layout.prefixes)
    stripped = f"Prefixes stripped when reading original checkpoints: {prefixes}. " if prefixes else ""
    lines += ["", f"{stripped}Names not listed are the same in both layouts."]
    return lines


def layouts_markdown() -> str:
    """The generated section: per family, its formats and its layout's key map."""
    lines: list[str] = []
    for family in family_names():
        facts = facts_class(family)
        layout = facts.original_layout()
        formats = facts.lora_formats()
        lines += [f"### {facts.display_name} (`{family}`)", ""]
        rows = ["| format | keys | module names | for |", "| --- | --- | --- | --- |"]
        rows.append(
            "| diffusers | `"
            + facts.denoiser_component
            + ".{module}.lora_A/.lora_B` + metadata | diffusers | dittune, diffusers' `load_lora_weights` |"
        )
        for name, spec in formats.items():
            names = spec.layout.name if spec.layout else "diffusers"
            rows.append(f"| {name} | `{EXAMPLE[spec.naming]}` | {names} | {spec.note} |")
        lines += [*rows, ""]
        if layout is None or not layout.original:
            lines += ["No original checkpoint layout: single files and exports use diffusers names.", ""]
            if layout is not None:
                lines += ["Module names the LoRA formats above resolve:", "", *_layout_table(layout), ""]
            continue
        lines += [
            f"Original layout **{layout.name}** (single files, `dittune export`, and the LoRA formats above):",
            "",
        ]
        lines += [*_layout_table(layout), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_section(text: str) -> str:
    """`text` with the generated section between the markers replaced."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{layouts_markdown()}\n{END}{tail}"
