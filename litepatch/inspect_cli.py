"""``litepatch inspect``: list the attention layers litepatch finds in a model (a dry run of ``apply``).

Examples:
    litepatch inspect --model my_package.models:build_dit
    litepatch inspect --model my_package.models:build_dit --threshold -6 --warmup-steps 4 --save-recipe mine.yaml
    litepatch inspect --diffusers WanTransformer3DModel --config '{"num_layers": 2, "num_attention_heads": 2}'
    litepatch inspect --diffusers WanTransformer3DModel \
        --pretrained Wan-AI/Wan2.1-T2V-1.3B-Diffusers --subfolder transformer
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", metavar="MODULE:FACTORY",
        help="a callable returning a torch.nn.Module (or a tuple whose first item is one), e.g. pkg.models:build",
    )
    source.add_argument(
        "--diffusers", metavar="CLASS",
        help="a diffusers model class (e.g. WanTransformer3DModel), built from --config or --pretrained",
    )
    parser.add_argument("--config", metavar="JSON", help="constructor kwargs for --diffusers (JSON object or file)")
    parser.add_argument("--pretrained", metavar="REPO_OR_DIR", help="load --diffusers weights via from_pretrained")
    parser.add_argument("--subfolder", help="subfolder for --pretrained (e.g. transformer)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    recipe = parser.add_argument_group("saving the settings as a recipe (litepatch.apply + handle.to_recipe())")
    recipe.add_argument("--save-recipe", metavar="PATH", help="write a recipe for this model (YAML) and exit")
    recipe.add_argument("--recipe", help="start from this recipe (path, built-in name or Hub reference)")
    recipe.add_argument("--threshold", type=float, help="skip threshold in log2 units (<= 0; -inf skips nothing)")
    recipe.add_argument("--warmup-steps", type=int, help="dense steps at the start of each generation")
    recipe.add_argument("--order", help="key-tile visiting order (anchor or alternate)")
    recipe.add_argument("--name", help="the recipe's name (default: the base recipe's, or 'custom')")


def _load_factory(spec: str):
    if ":" not in spec:
        raise ValueError(f"--model must be MODULE:FACTORY (e.g. my_pkg.models:build), got {spec!r}")
    module_name, attr = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"--model {spec!r}: cannot import module {module_name!r} ({err})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {spec!r}: {attr} is not callable")
    return obj


def build_model(args: argparse.Namespace):
    """The model named by the arguments (a ``torch.nn.Module`` or a diffusers pipeline)."""
    import torch

    if args.model:
        if args.config or args.pretrained:
            raise ValueError("--config and --pretrained go with --diffusers, not --model")
        model = _load_factory(args.model)()
        if isinstance(model, tuple) and model:
            model = model[0]
        if not isinstance(model, torch.nn.Module) and not hasattr(model, "transformer"):
            raise ValueError(f"--model {args.model!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    import diffusers

    cls = getattr(diffusers, args.diffusers, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"diffusers has no model class {args.diffusers!r} (diffusers {diffusers.__version__})")
    if args.pretrained:
        kwargs = {"subfolder": args.subfolder} if args.subfolder else {}
        return cls.from_pretrained(args.pretrained, **kwargs)
    config = {}
    if args.config:
        text = args.config
        if os.path.isfile(text):
            with open(text) as f:
                text = f.read()
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config must be a JSON object of constructor kwargs, got {type(config).__name__}")
    try:
        with torch.device("meta"):
            return cls(**config)
    except TypeError as err:
        raise ValueError(f"cannot build {args.diffusers} from --config: {err}") from None


def format_table(infos) -> str:
    """The table ``litepatch inspect`` prints."""
    headers = ("name", "kind", "sparse", "heads", "head_dim", "class", "reason")
    rows = [(i.name or "<root>", i.kind, "yes" if i.sparse else "OUT OF REACH" if i.out_of_reach else "no",
             str(i.heads or "?"), str(i.head_dim or "?"), i.module_class,
             i.reason + (f" | out of reach: {i.out_of_reach}" if i.out_of_reach else "")) for i in infos]
    widths = [max(len(h), *(len(r[c]) for r in rows)) if rows else len(h) for c, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    sparse = sum(i.sparse for i in infos)
    lines.append(f"{len(infos)} attention layers, {sparse} made sparse by litepatch")
    return "\n".join(lines)


def save_recipe(model, args: argparse.Namespace) -> int:
    """``--save-recipe``: patch ``model`` with the given settings and write ``handle.to_recipe()``."""
    from litepatch import recipes
    from litepatch.api import apply

    handle = apply(model, recipe=args.recipe, threshold=args.threshold, warmup_steps=args.warmup_steps,
                             order=args.order)
    try:
        path = recipes.save(handle.to_recipe(args.name, measured=False), args.save_recipe)
    finally:
        handle.remove()
    print(f"recipe written to {path} ({len(handle.layers)} layers, threshold {handle.recipe.threshold})")
    return 0


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from litepatch.api import inspect

    model = build_model(args)
    if args.save_recipe:
        return save_recipe(model, args)
    if any(v is not None for v in (args.recipe, args.threshold, args.warmup_steps, args.order, args.name)):
        raise ValueError("--recipe/--threshold/--warmup-steps/--order/--name go with --save-recipe")
    infos = inspect(model)
    if args.json:
        print(json.dumps([dataclasses.asdict(i) for i in infos], indent=2))
    else:
        print(format_table(infos))
    return 0 if infos else 1
