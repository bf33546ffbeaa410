"""Converting checkpoints and LoRA adapters between diffusers names and a family's original `Layout`.

Full checkpoints: fused modules concatenate their parts' rows (weights and biases) and split them back.
LoRA adapters, kept as `LoraModule`s (down = A, rank × in; up = B, out × rank; alpha, scale = alpha / rank):
- A `Rename` keeps the adapter (swapping the halves of B's rows where the rule swaps them).
- A `Fuse` of parts with ranks r₁…rₙ becomes one adapter of rank Σrᵢ: A = the parts' A stacked, B = their B
  block-diagonal, so B·A is exactly the parts' updates stacked. Parts of other scales have their B rescaled to
  the first part's scale; parts without an adapter get zero rows. `FusedPart` records what was fused, so that
  splitting gives back the very tensors.
- Splitting a fused adapter: by the record when there is one; else by its block-diagonal structure when it has
  one (equal ranks, zero off-diagonal blocks); else every part shares A and takes its rows of B, which is exact
  for the update but keeps the fused rank.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from dittune.models.layout import Fuse, Key, Layout, Match, Rename


@dataclass
class LoraModule:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update scale · B · A (float32)."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass(frozen=True)
class FusedPart:
    """One part of a fused adapter: our module name (None where the part had no adapter), its rows, rank, alpha."""

    name: str | None
    rows: int
    rank: int
    alpha: float

    def as_list(self) -> list:
        return [self.name, self.rows, self.rank, self.alpha]

    @classmethod
    def from_list(cls, value: list) -> FusedPart:
        name, rows, rank, alpha = value
        return cls(name, int(rows), int(rank), float(alpha))


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _features(state: dict[str, torch.Tensor], weight_key: str) -> int | None:
    """The input features of the module whose weight is `weight_key` in `state`, or None."""
    weight = state.get(weight_key)
    return None if weight is None or weight.ndim < 2 else weight.shape[1]


def _split_key(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


# ------------------------------------------------------------------------------------------ checkpoints


def to_theirs_state(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the original layout."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    rules: dict[tuple[str, str], Match] = {}
    for key, tensor in state.items():
        match = layout.match_ours(key)
        if match is not None and isinstance(match.rule, Key):
            out[match.theirs] = tensor
            continue
        module, param = _split_key(key)
        match = layout.match_ours(module)
        if match is None or isinstance(match.rule, Key):
            out[key] = tensor
        elif isinstance(match.rule, Rename):
            swap = match.rule.swaps(tensor.shape[0], _features(state, f"{module}.weight"))
            out[f"{match.theirs}.{match.rule.their_param(param)}"] = _swap_halves(tensor) if swap else tensor
        else:
            fused[(match.theirs, param)][match.part] = tensor
            rules[(match.theirs, param)] = match
    for (theirs, param), parts in fused.items():
        match = rules[(theirs, param)]
        missing = [name for part, name in enumerate(match.ours) if part not in parts]
        if missing:
            raise ValueError(f"cannot write {theirs}.{param}: the checkpoint lacks {missing}")
        out[f"{theirs}.{param}"] = torch.cat([parts[part] for part in range(len(match.ours))], dim=0)
    return out


def from_theirs_state(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """An original-layout state dict (prefixes such as `model.diffusion_model.` stripped) in diffusers names."""
    out: dict[str, torch.Tensor] = {}
    for raw_key, tensor in state.items():
        key = layout.strip_prefix(raw_key)
        match = layout.match_theirs(key)
        if match is not None and isinstance(match.rule, Key):
            out[match.ours[0]] = tensor
            continue
        module, param = _split_key(key)
        match = layout.match_theirs(module)
        if match is None or isinstance(match.rule, Key):
            out[key] = tensor
        elif isinstance(match.rule, Rename):
            weight = raw_key[: len(raw_key) - len(param)] + match.rule.their_param("weight")
            swap = match.rule.swaps(tensor.shape[0], _features(state, weight))
            out[f"{match.ours[0]}.{match.rule.our_param(param)}"] = _swap_halves(tensor) if swap else tensor
        else:
            rows = match.rule.part_rows(tensor.shape[0])
            for name, piece in zip(match.ours, torch.split(tensor, rows, dim=0), strict=True):
                out[f"{name}.{param}"] = piece.contiguous()
    return out


# ------------------------------------------------------------------------------------------ LoRA


def lora_to_theirs(
    modules: dict[str, LoraModule], layout: Layout
) -> tuple[dict[str, LoraModule], dict[str, list[FusedPart]]]:
    """Adapters on our modules → adapters on the original modules, and the record of every fusion."""
    out: dict[str, LoraModule] = {}
    groups: dict[str, dict[int, str]] = defaultdict(dict)
    matches: dict[str, Match] = {}
    for name, module in modules.items():
        match = layout.match_ours(name)
        if match is None or isinstance(match.rule, Key):
            out[name] = module
        elif isinstance(match.rule, Rename):
            swap = match.rule.swaps(module.up.shape[0], module.down.shape[1])
            out[match.theirs] = LoraModule(module.down, _swap_halves(module.up) if swap else module.up, module.alpha)
        else:
            groups[match.theirs][match.part] = name
            matches[match.theirs] = match
    record: dict[str, list[FusedPart]] = {}
    for theirs, present in groups.items():
        out[theirs], parts = _fuse(matches[theirs].rule, present, modules)
        if parts:
            record[theirs] = parts
    return out, record


def _fuse(rule: Fuse, present: dict[int, str], modules: dict[str, LoraModule]) -> tuple[LoraModule, list[FusedPart]]:
    first = modules[present[min(present)]]
    known = min(present)
    unit_rows = modules[present[known]].up.shape[0] // rule.ratio(known)
    scale = first.scale
    parts: list[FusedPart] = []
    downs, ups = [], []
    for part in range(len(rule.ours)):
        if part not in present:
            parts.append(FusedPart(None, unit_rows * rule.ratio(part), 0, 0.0))
            continue
        module = modules[present[part]]
        parts.append(FusedPart(present[part], module.up.shape[0], module.rank, module.alpha))
        downs.append(module.down)
        # another scale: B rescaled in fp32 (and kept so), so the update stays exact
        ups.append(module.up if module.scale == scale else module.up.float() * (module.scale / scale))
    shared = [modules[present[part]] for part in sorted(present)]
    if len(present) == len(rule.ours) and all(
        torch.equal(m.down, first.down) and m.scale == scale for m in shared
    ):  # one A for every part (a fused adapter split earlier): stacking B is exact at the same rank
        return LoraModule(first.down, torch.cat([m.up for m in shared], dim=0), first.alpha), []
    rank = sum(p.rank for p in parts)
    dtype = (
        torch.promote_types(first.up.dtype, torch.float32)
        if any(u.dtype != first.up.dtype for u in ups)
        else first.up.dtype
    )
    up = torch.zeros(sum(p.rows for p in parts), rank, dtype=dtype)
    row = column = 0
    pieces = iter(ups)
    for part in parts:
        if part.name is not None:
            up[row : row + part.rows, column : column + part.rank] = next(pieces)
            column += part.rank
        row += part.rows
    return LoraModule(torch.cat(downs, dim=0), up, scale * rank), parts


def lora_from_theirs(
    modules: dict[str, LoraModule], layout: Layout, record: dict[str, list[FusedPart]] | None = None
) -> dict[str, LoraModule]:
    """Adapters on original modules → adapters on our modules (see the module docstring for fused ones)."""
    out: dict[str, LoraModule] = {}
    for name, module in modules.items():
        match = layout.match_theirs(name)
        if match is None or isinstance(match.rule, Key):
            out[name] = module
        elif isinstance(match.rule, Rename):
            swap = match.rule.swaps(module.up.shape[0], module.down.shape[1])
            out[match.ours[0]] = LoraModule(module.down, _swap_halves(module.up) if swap else module.up, module.alpha)
        elif record and name in record and _fits(module, record[name]):
            out.update(_split_recorded(module, record[name]))
        else:
            out.update(_split(module, match))
    return out


def _fits(module: LoraModule, parts: list[FusedPart]) -> bool:
    """Whether a fusion record still describes the tensors (a resize or merge tool may have kept the metadata)."""
    return sum(p.rank for p in parts) == module.rank and sum(p.rows for p in parts) == module.up.shape[0]


def _split_recorded(module: LoraModule, parts: list[FusedPart]) -> dict[str, LoraModule]:
    out = {}
    row = column = 0
    for part in parts:
        if part.name is not None:
            down = module.down[column : column + part.rank].contiguous()
            up = module.up[row : row + part.rows, column : column + part.rank].contiguous()
            scale = part.alpha / part.rank
            if scale != module.scale:
                up = up.float() * (module.scale / scale)
            out[part.name] = LoraModule(down, up, part.alpha)
            column += part.rank
        row += part.rows
    return out


def _split(module: LoraModule, match: Match) -> dict[str, LoraModule]:
    rule = match.rule
    names = match.ours
    rows = rule.part_rows(module.up.shape[0])
    ups = torch.split(module.up, rows, dim=0)
    count = len(names)
    if module.rank % count == 0:
        rank = module.rank // count
        blocks = [up[:, part * rank : (part + 1) * rank] for part, up in enumerate(ups)]
        off_diagonal_zero = all(
            not up[:, other * rank : (other + 1) * rank].any()
            for part, up in enumerate(ups)
            for other in range(count)
            if other != part
        )
        if off_diagonal_zero:
            downs = torch.split(module.down, rank, dim=0)
            return {
                name: LoraModule(down.contiguous(), block.contiguous(), module.scale * rank)
                for name, down, block in zip(names, downs, blocks, strict=True)
            }
    return {
        name: LoraModule(module.down.clone(), up.contiguous(), module.alpha)
        for name, up in zip(names, ups, strict=True)
    }
