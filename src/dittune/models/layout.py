"""Original checkpoint layouts: how a family's diffusers module names map to its official checkpoints' names.

A family whose original checkpoints (BFL's Flux, Stability's SD3, Tencent's Hunyuan-DiT and HunyuanVideo, ...)
name modules differently from diffusers declares a `Layout`: a list of rules, each a module template with `{i}`
for a block index. The same rules convert whole checkpoints (`layout_convert.to_theirs_state` /
`from_theirs_state`) and LoRA adapters (`layout_convert.lora_to_theirs` / `lora_from_theirs`), and resolve the
underscore-flattened module names of kohya files. Torch-free: declarations and name mapping only.

Rules:
- `Rename`: one diffusers module ↔ one original module (parameter names may differ, e.g. `weight` ↔ `scale`;
  `swap_halves` where the two layouts order a modulation's (shift, scale) rows oppositely; `swap_if_rows` where
  only modules of one shape swap).
- `Fuse`: several diffusers modules ↔ one original module whose output rows are theirs concatenated (fused
  q/k/v projections). `ratios` gives the parts' relative row counts (None: equal).
- `Key`: one tensor ↔ one tensor (a bare parameter such as a positional table).
Names no rule covers are the same in both layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property


def _template_regex(template: str, flat: bool = False) -> re.Pattern[str]:
    text = template.replace(".", "_") if flat else template
    return re.compile(re.escape(text).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


def _fill(template: str, index: str | None) -> str:
    return template if index is None else template.replace("{i}", index)


@dataclass(frozen=True)
class Rename:
    ours: str
    theirs: str
    params: tuple[tuple[str, str], ...] = ()
    """(our parameter name, theirs) pairs that differ, e.g. (("weight", "scale"),)."""
    swap_halves: bool = False
    swap_if_rows: int | None = None
    """With `swap_halves`: swap only where the module's output rows are this many times its input features
    (SD3's pre-only last context block modulates with 2 × width rows, the other blocks' 6 × keep their order)."""

    def swaps(self, rows: int, features: int | None) -> bool:
        """Whether the rows of a tensor of this module (`rows` outputs, `features` inputs) swap their halves."""
        if not self.swap_halves or self.swap_if_rows is None:
            return self.swap_halves
        if features is None:
            raise ValueError(f"{self.ours} ↔ {self.theirs}: the swap depends on the weight's shape, which is missing")
        return rows == self.swap_if_rows * features

    def their_param(self, param: str) -> str:
        return dict(self.params).get(param, param)

    def our_param(self, param: str) -> str:
        return {theirs: ours for ours, theirs in self.params}.get(param, param)


@dataclass(frozen=True)
class Fuse:
    ours: tuple[str, ...]
    theirs: str
    ratios: tuple[int, ...] | None = None
    """Relative output rows of the parts, e.g. (1, 1, 1, 4) for q, k, v and a 4× MLP; None: equal."""

    def part_rows(self, total: int) -> list[int]:
        """Rows of each part in a fused output of `total` rows."""
        ratios = self.ratios or (1,) * len(self.ours)
        unit, left = divmod(total, sum(ratios))
        if left:
            raise ValueError(f"{self.theirs}: {total} output rows do not split in the ratio {ratios}")
        return [unit * r for r in ratios]

    def ratio(self, part: int) -> int:
        return (self.ratios or (1,) * len(self.ours))[part]


@dataclass(frozen=True)
class Key:
    ours: str
    theirs: str


Rule = Rename | Fuse | Key


@dataclass(frozen=True)
class Match:
    """A module name resolved by a rule: the rule, the block index (or None) and the part (for `Fuse`, ours)."""

    rule: Rule
    index: str | None
    part: int | None = None

    @property
    def theirs(self) -> str:
        return _fill(self.rule.theirs, self.index)

    @property
    def ours(self) -> list[str]:
        names = self.rule.ours if isinstance(self.rule, Fuse) else (self.rule.ours,)
        return [_fill(name, self.index) for name in names]


@dataclass(frozen=True)
class Layout:
    """A family's original checkpoint layout (`name`, e.g. "bfl") as rules over diffusers module names."""

    name: str
    rules: tuple[Rule, ...]
    prefixes: tuple[str, ...] = field(default=("model.diffusion_model.",))
    """Prefixes original checkpoints may carry before the module names (stripped when read)."""
    original: bool = True
    """False for a layout that only lists the diffusers names (to resolve kohya names and detect the family):
    the family has no original checkpoint layout to export to."""

    @cached_property
    def _ours(self) -> list[tuple[re.Pattern[str], Rule, int | None]]:
        patterns = []
        for rule in self.rules:
            names = rule.ours if isinstance(rule, Fuse) else (rule.ours,)
            patterns += [
                (_template_regex(name), rule, part if isinstance(rule, Fuse) else None)
                for part, name in enumerate(names)
            ]
        return patterns

    @cached_property
    def _theirs(self) -> list[tuple[re.Pattern[str], Rule]]:
        return [(_template_regex(rule.theirs), rule) for rule in self.rules]

    @cached_property
    def _flat(self) -> list[tuple[re.Pattern[str], Rule]]:
        return [(_template_regex(rule.theirs, flat=True), rule) for rule in self.rules if not isinstance(rule, Key)]

    def match_ours(self, name: str) -> Match | None:
        """The rule covering our module (or tensor, for `Key`) `name`, or None (same name in both layouts)."""
        for pattern, rule, part in self._ours:
            found = pattern.match(name)
            if found:
                return Match(rule, found.groupdict().get("i"), part)
        return None

    def match_theirs(self, name: str) -> Match | None:
        """The rule covering an original module (or tensor) `name`, or None."""
        for pattern, rule in self._theirs:
            found = pattern.match(name)
            if found:
                return Match(rule, found.groupdict().get("i"))
        return None

    def unflatten(self, flat: str) -> str | None:
        """The original module name whose dots became underscores in `flat` (kohya names), or None."""
        for pattern, rule in self._flat:
            found = pattern.match(flat)
            if found:
                return _fill(rule.theirs, found.groupdict().get("i"))
        return None

    def strip_prefix(self, key: str) -> str:
        for prefix in self.prefixes:
            if key.startswith(prefix):
                return key[len(prefix) :]
        return key


@dataclass(frozen=True)
class LoraFormat:
    """How a family writes one foreign LoRA format: the key naming (`kohya`, `comfyui` or `peft`, see
    `dittune.export.lora_formats`) over the original layout's module names, or diffusers' names (layout None)."""

    naming: str
    layout: Layout | None
    note: str = ""
    """What the format is for, shown by `dittune lora inspect` and in docs/formats.md."""
