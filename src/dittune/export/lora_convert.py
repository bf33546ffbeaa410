"""Reading any LoRA dittune knows into diffusers module names, and writing it in another format.

`resolve_lora` reads a file or PEFT folder, detects its naming (`lora_formats.detect_naming`), its family
(dittune's metadata, `--family`, or the one family whose layout explains every module name) and turns its
adapters into adapters on the diffusers denoiser's modules through the family's `Layout`. `convert_lora`
writes them in a format the family declares (`FamilyFacts.lora_formats`) or as a dittune (diffusers) file;
`describe_lora` says what a file holds and where each key goes. Nothing here names a family.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import SafetensorError

from dittune.export.lora_file import FORMAT, LoraInfo, read_lora, save_lora
from dittune.export.lora_formats import PEFT_WEIGHTS, LoraTensors, read_tensors, write_tensors
from dittune.models.layout import Fuse, Layout, LoraFormat, Rename
from dittune.models.layout_convert import FusedPart, LoraModule, lora_from_theirs, lora_to_theirs
from dittune.models.registry import facts_class, family_names
from dittune.models.weight_files import safetensors_problem

FORMATS = ("diffusers", "kohya", "comfyui", "official")
"""`dittune lora convert --to` choices; which a family has: `FamilyFacts.lora_formats` (diffusers always)."""


class FamilyUnknown(ValueError):
    """A LoRA's family could not be told from its metadata or module names."""


@dataclass
class ResolvedLora:
    """A LoRA on the diffusers denoiser: adapters by module name (relative to `component`)."""

    family: str
    format: str
    modules: dict[str, LoraModule]
    component: str
    tensors: LoraTensors
    info: LoraInfo | None = None
    """dittune's settings, when the file (or the file it was converted from) was written by dittune."""
    family_from: str = "metadata"
    layout: Layout | None = None
    fused: dict[str, list[FusedPart]] = field(default_factory=dict)
    theirs: dict[str, LoraModule] = field(default_factory=dict)
    """The adapters under the file's own module names (dotted), before conversion."""

    @property
    def native(self) -> bool:
        """Whether this is a dittune training output as written (loaded as trained, target suffixes and all)."""
        return self.format == "diffusers" and self.info is not None and "converted_from" not in self.info.extra


def resolve_lora(path: Path, family: str | None = None) -> ResolvedLora:
    """Read `path` (any supported format) into adapters on the diffusers denoiser of its family."""
    tensors = _read_tensors(Path(path))
    if tensors.naming == "diffusers" and "dittune_lora" in tensors.metadata:
        state, info = read_lora(Path(path))
        if family is not None and family != info.family:
            raise ValueError(f"{path} is a {info.family} LoRA (its metadata says so), not {family}")
        modules = {
            name: LoraModule(state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], _alpha(info, name))
            for name in sorted({k.rsplit(".lora_", 1)[0] for k in state})
        }
        return ResolvedLora(info.family, "diffusers", modules, info.component, tensors, info, theirs=modules)
    source = tensors.source
    family_from = "--family" if family else "metadata" if source.get("family") else "module names"
    family = family or source.get("family") or _detect_family(tensors)
    facts = facts_class(family)
    format_name, spec = _format_of(facts, tensors.naming, Path(path))
    layout = spec.layout if spec else None
    theirs = _dotted(tensors, layout, Path(path))
    fused = {k: [FusedPart.from_list(p) for p in parts] for k, parts in source.get("fused", {}).items()}
    modules = lora_from_theirs(theirs, layout, fused) if layout else dict(theirs)
    info = LoraInfo(**source["dittune"]) if "dittune" in source else None
    component = source.get("component") or facts.denoiser_component
    return ResolvedLora(family, format_name, modules, component, tensors, info, family_from, layout, fused, theirs)


def _read_tensors(path: Path) -> LoraTensors:
    """`read_tensors`, with a truncated, damaged or non-LoRA file reported as a ValueError naming it."""
    weights = path / PEFT_WEIGHTS if path.is_dir() else path
    problem = safetensors_problem(weights) if weights.suffix == ".safetensors" and weights.is_file() else None
    if problem:
        raise ValueError(f"LoRA file {problem}")
    try:
        return read_tensors(path)
    except SafetensorError as error:
        raise ValueError(f"LoRA file {weights} cannot be read ({error}); copy it again") from None
    except ValueError as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"{path}: {error}; is it a LoRA?") from None


def _alpha(info: LoraInfo, name: str) -> float:
    return float(info.alpha_pattern.get(name, info.alpha))


def _format_of(facts, naming: str, path: Path) -> tuple[str, LoraFormat | None]:
    if naming == "diffusers":
        return "diffusers", None
    for name, spec in facts.lora_formats().items():
        if spec.naming == naming:
            return name, spec
    raise ValueError(f"{path}: {naming} LoRA files are not a format dittune knows for {facts.display_name}")


def _dotted(tensors: LoraTensors, layout: Layout | None, path: Path) -> dict[str, LoraModule]:
    if tensors.naming != "kohya":
        return tensors.modules
    if layout is None:
        raise ValueError(f"{path}: kohya names need the family's original layout, which it does not declare")
    out, unknown = {}, []
    for flat, module in tensors.modules.items():
        name = layout.unflatten(flat)
        if name is None:
            unknown.append(flat)
        else:
            out[name] = module
    if unknown:
        raise ValueError(f"{path}: kohya modules the {layout.name} layout does not know: {unknown[:5]}")
    return out


def _detect_family(tensors: LoraTensors) -> str:
    """The one family whose layout explains every module name of the file."""
    candidates = [family for family in family_names() if _explains(facts_class(family), tensors)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FamilyUnknown(
            f"no dittune family's layout explains this {tensors.naming} LoRA's module names "
            f"(e.g. {next(iter(tensors.modules))}); pass --family"
        )
    raise FamilyUnknown(f"this {tensors.naming} LoRA fits several families ({', '.join(candidates)}); pass --family")


def _explains(facts, tensors: LoraTensors) -> bool:
    names = list(tensors.modules)
    if tensors.naming == "diffusers":
        layouts = [facts.original_layout()]
        return layouts[0] is not None and all(layouts[0].match_ours(n) for n in names)
    spec = next((s for s in facts.lora_formats().values() if s.naming == tensors.naming), None)
    if spec is None or spec.layout is None:
        return False
    if tensors.naming == "kohya":
        return all(spec.layout.unflatten(n) for n in names)
    return all(spec.layout.match_theirs(n) for n in names)


# ------------------------------------------------------------------------------------------ writing


def convert_lora(source: Path, out: Path, to: str, family: str | None = None) -> tuple[Path, ResolvedLora]:
    """Write the LoRA at `source` to `out` in format `to` (see `FORMATS`)."""
    if to not in FORMATS:
        raise ValueError(f"--to {to}: use one of {', '.join(FORMATS)}")
    lora = resolve_lora(source, family)
    facts = facts_class(lora.family)
    out = Path(out)
    if to == "diffusers":
        if out.suffix != ".safetensors":
            raise ValueError(f"{out}: a diffusers LoRA is one .safetensors file")
        info = _info(lora)
        state = {}
        for name, module in lora.modules.items():
            state[f"{name}.lora_A.weight"] = module.down
            state[f"{name}.lora_B.weight"] = module.up
        return save_lora(out, state, info), lora
    formats = facts.lora_formats()
    if to not in formats:
        have = ", ".join(["diffusers", *formats])
        raise ValueError(f"{facts.display_name} LoRAs have no {to} format in dittune; available: {have}")
    spec = formats[to]
    if spec.naming == "peft" and out.suffix:
        raise ValueError(f"{out}: a {to} LoRA is a folder (adapter_config.json + adapter_model.safetensors)")
    if spec.naming != "peft" and out.suffix != ".safetensors":
        raise ValueError(f"{out}: a {to} LoRA is one .safetensors file")
    theirs, fused = lora_to_theirs(lora.modules, spec.layout) if spec.layout else (lora.modules, {})
    info = _info(lora)
    meta = {
        "format": to,
        "family": lora.family,
        "component": lora.component,
        "layout": spec.layout.name if spec.layout else "diffusers",
        "produced_by": f"dittune {_version()}",
        "converted_from": lora.format,
        "base_model": info.base_model,
        "fused": {name: [part.as_list() for part in parts] for name, parts in fused.items()},
        "dittune": asdict(info),
    }
    ranks = Counter(m.rank for m in theirs.values())
    alphas = Counter(m.alpha for m in theirs.values())
    extra = {}
    if spec.naming == "kohya":  # what kohya's GUI and A1111-style UIs show
        extra = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.most_common(1)[0][0]),
            "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}",
        }
    return write_tensors(out, theirs, spec.naming, meta, extra), lora


def _info(lora: ResolvedLora) -> LoraInfo:
    """dittune's settings for the adapters: the file's own when it carries them, else read off the tensors."""
    ranks = {name: m.rank for name, m in lora.modules.items()}
    alphas = {name: m.alpha for name, m in lora.modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    if lora.info is not None and set(ranks.values()) == {lora.info.rank} and set(alphas.values()) == {lora.info.alpha}:
        info = LoraInfo(**asdict(lora.info))
    else:
        info = LoraInfo(
            family=lora.family,
            component=lora.component,
            rank=rank,
            alpha=alpha,
            targets=sorted(lora.modules),
            base_model=lora.info.base_model if lora.info else "",
            rank_pattern={n: r for n, r in ranks.items() if r != rank},
            alpha_pattern={n: a for n, a in alphas.items() if a != alpha},
        )
    if lora.format != "diffusers" and "converted_from" not in info.extra:
        info.extra = {**info.extra, "converted_from": lora.format}
    return info


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dittune")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------ inspect


def describe_lora(path: Path, family: str | None = None) -> str:
    """What `dittune lora inspect` prints: format, family, rank, alpha, targets and the key map."""
    lora = resolve_lora(path, family)
    facts = facts_class(lora.family)
    source = lora.tensors.source
    producer = source.get("produced_by") or ("dittune" if lora.info else "unknown (no dittune metadata)")
    ranks = Counter(m.rank for m in lora.theirs.values())
    alphas = Counter(m.alpha for m in lora.theirs.values())
    lines = [
        f"file:     {path}",
        f"format:   {lora.format} ({lora.tensors.naming} keys{', ' + FORMAT if lora.info and lora.native else ''})",
        f"produced: {producer}",
        f"family:   {lora.family} ({facts.display_name}; from {lora.family_from})",
        f"adapters: {len(lora.theirs)} in the file → {len(lora.modules)} on {lora.component} modules",
        f"rank:     {_counts(ranks)}",
        f"alpha:    {_counts(alphas, '{:g}')} (scale = alpha / rank)",
        f"targets:  {', '.join(_suffixes(lora.modules))}",
    ]
    if lora.info and lora.info.base_model:
        lines.append(f"base:     {lora.info.base_model}")
    if lora.tensors.ignored:
        lines.append(f"ignored:  {len(lora.tensors.ignored)} keys (other components), e.g. {lora.tensors.ignored[0]}")
    lines.append("key map (file module → diffusers module):")
    lines += [f"  {line}" for line in _key_map(lora)]
    return "\n".join(lines)


def _counts(counter: Counter, fmt: str = "{}") -> str:
    return ", ".join(
        f"{fmt.format(value)} ×{count}" if len(counter) > 1 else fmt.format(value)
        for value, count in counter.most_common()
    )


def _suffixes(modules: dict[str, LoraModule]) -> list[str]:
    return sorted({re.sub(r"^.*?\.\d+\.", "", name) for name in modules})


def _key_map(lora: ResolvedLora) -> list[str]:
    """One line per module pattern (block numbers as {i}), with counts and how fused modules were split."""
    grouped: dict[tuple[str, str], int] = Counter()
    for name, module in lora.theirs.items():
        match = lora.layout.match_theirs(name) if lora.layout else None
        ours = "/".join(match.ours) if match else name
        how = ""
        if match and isinstance(match.rule, Fuse):
            parts = lora.fused.get(name)
            if parts:
                how = (
                    f"  [fused rank {module.rank} = "
                    + " + ".join(str(p.rank) for p in parts)
                    + ": A stacked, B block-diagonal]"
                )
            else:
                how = f"  [fused rank {module.rank}: split rows of B]"
        elif match and isinstance(match.rule, Rename) and match.rule.swaps(module.up.shape[0], module.down.shape[1]):
            how = "  [(shift, scale) rows swapped]"
        grouped[(re.sub(r"\.\d+\.", ".{i}.", name, count=1), re.sub(r"\.\d+\.", ".{i}.", ours, count=1) + how)] += 1
    width = max((len(theirs) for theirs, _ in grouped), default=0)
    return [
        f"{theirs:<{width}} → {ours}" + (f"  (×{n})" if n > 1 else "") for (theirs, ours), n in sorted(grouped.items())
    ]
