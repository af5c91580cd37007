"""The model card of a recipes repository on the Hub: one README section per recipe (quality and speed table,
fingerprint, context, provenance, usage), merged into the README that is already there.

Example:
    >>> print(model_card(recipe, "me/litepatch-recipes"))
"""

from __future__ import annotations

import math
from typing import Any

from .schema import Recipe


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float) and math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return format(value, spec)


def _yaml_scalar(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_card(recipe: Recipe, repo_id: str, *, name: str | None = None) -> str:
    """The README section for one recipe: quality/speed table, fingerprint, context, provenance, usage."""
    name = name or recipe.name
    m, c, fp, p = recipe.measured, recipe.context, recipe.fingerprint, recipe.provenance
    lines = [
        f"## `{name}`",
        "",
        recipe.description or "",
        "",
        "| quality / speed | value |",
        "|---|---|",
        f"| PSNR vs dense (dB) | {_fmt(m.psnr, '.2f')} |",
        f"| SSIM vs dense | {_fmt(m.ssim, '.4f')} |",
        f"| relative L2 vs dense | {_fmt(m.rel_l2, '.4g')} |",
        f"| attention tiles computed | {_fmt(m.kept_fraction, '.1%')} |",
        f"| speed-up | {_fmt(m.speedup, '.2f')}{'x' if m.speedup is not None else ''} |",
        f"| hardware | {m.hardware or 'not recorded'} |",
        f"| litepatch version | {m.litepatch_version or 'not recorded'} |",
        "",
        f"Default threshold {_fmt(recipe.threshold)} (log2 units), warm-up steps {recipe.warmup_steps}, "
        f"visiting order `{recipe.order}`, {len(recipe.layers)} per-layer override(s).",
        "",
        "**Model fingerprint**: "
        + (
            f"`{fp.model_class or '?'}`, {fp.num_layers} attention layers, {fp.heads} heads, head dim {fp.head_dim}"
            + (f" (layers `{fp.layer_names[0]}` ... `{fp.layer_names[-1]}`)" if fp.layer_names else "")
            if fp is not None
            else "none (applies to any model)"
        ),
        "",
        f"**Context**: resolution {c.resolution or '-'}, frames {c.frames or '-'}, steps {c.steps or '-'}, "
        f"scheduler {c.scheduler or '-'}, CFG {c.cfg_mode or '-'}.",
        "",
        f"**Provenance**: {p.source}" + (f"; budget {p.budget}" if p.budget else "")
        + (f"; study {p.study}" if p.study else "") + (f"; {len(p.prompts)} prompt(s)" if p.prompts else "")
        + (f", seeds {p.seeds}" if p.seeds else "") + ".",
        "",
    ]
    if p.notes:
        lines += [p.notes, ""]
    lines += [
        "```python",
        "import litepatch",
        f'handle = litepatch.apply(pipe.transformer, recipe="{repo_id}/{name}")  # pin a commit with @<sha>',
        "video = pipe(prompt).frames",
        "print(handle.stats())",
        "```",
        "",
        f"CLI: `litepatch recipes show {repo_id}/{name}`",
    ]
    return "\n".join(lines).strip() + "\n"


_HEADER = """---
library_name: litepatch
tags:
- litepatch
- liteattention
- sparse-attention
- diffusion
---

# LiteAttention recipes for litepatch

Per-layer LiteAttention settings for [litepatch](https://github.com/litepatch/litepatch). Each `NAME.yaml`
is a recipe: data only (YAML), checked against the model's fingerprint before it is applied.
"""


def _section_markers(name: str) -> tuple[str, str]:
    return f"<!-- litepatch-recipe: {name} -->", f"<!-- /litepatch-recipe: {name} -->"


def merge_readme(existing: str | None, section: str, name: str) -> str:
    """Adds or replaces the section of recipe ``name`` in a repository README (other sections are kept)."""
    start, end = _section_markers(name)
    block = f"{start}\n{section}{end}\n"
    if not existing or "<!-- litepatch-recipe:" not in existing:
        text = existing if existing and existing.strip() else _HEADER
        return text.rstrip("\n") + "\n\n" + block
    if start in existing and end in existing:
        before, _, rest = existing.partition(start)
        _, _, after = rest.partition(end)
        return before + block + after.lstrip("\n")
    return existing.rstrip("\n") + "\n\n" + block
