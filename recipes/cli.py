"""``litepatch recipes list|show|pull|push``: built-in recipes and recipes on the Hugging Face Hub.

Errors are raised as :class:`~litepatch.recipes.RecipeError` (a ``ValueError``); ``litepatch.cli``
prints them as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import textwrap

REF_HELP = "a path to a .yaml file, a built-in name (see `litepatch recipes list`) or org/repo/name[@revision]"


def _hub_options(parser: argparse.ArgumentParser, *, download: bool = True) -> None:
    parser.add_argument("--revision", help="Hub branch, tag or commit (same as REF@revision)")
    parser.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the one saved by `hf auth login`)")
    parser.add_argument("--timeout", type=float,
                        help="seconds the Hub may take in all (default: $LITEPATCH_HUB_TIMEOUT or 10)")
    if download:
        parser.add_argument("--cache-dir", help="huggingface_hub cache directory (default: HF_HUB_CACHE)")
        parser.add_argument(
            "--offline", action="store_true", help="use only the local cache (like HF_HUB_OFFLINE=1)"
        )
        parser.add_argument("--recipes-repo", help="Hub repository for short names (default: $LITEPATCH_RECIPES_REPO)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipes_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("list", help="list the built-in recipes and where their numbers come from",
                       description="List the built-in recipes with their model, context and provenance.")
    p.add_argument("--verbose", "-v", action="store_true", help="also print each recipe's provenance notes in full")

    p = sub.add_parser("show", help="print a recipe as YAML (validated)",
                       description="Resolve a recipe (file, built-in or Hub), validate it and print it as YAML.")
    p.add_argument("ref", metavar="REF", help=REF_HELP)
    _hub_options(p)

    p = sub.add_parser("pull", help="download a Hub recipe into the huggingface_hub cache",
                       description="Download org/repo/name[@revision] into the huggingface_hub cache, so that it "
                                   "also works offline (HF_HUB_OFFLINE=1) afterwards. Prints the cached path.")
    p.add_argument("ref", metavar="REF", help="org/repo/name[@revision], or a name in the default recipes repo")
    _hub_options(p)

    p = sub.add_parser("push", help="upload a recipe and its model card to a Hub repository",
                       description="Upload FILE as <name>.yaml to the Hub model repository REPO_ID (created when "
                                   "missing) and add its section to the README model card, in one commit.")
    p.add_argument("file", metavar="FILE", help=REF_HELP)
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model repository, org/repo")
    p.add_argument("--name", help="file name in the repository (default: the recipe's name)")
    p.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    p.add_argument("--message", "-m", help="commit message")
    _hub_options(p, download=False)


def _describe(recipe) -> list[str]:  # noqa: ANN001
    fp, c = recipe.fingerprint, recipe.context
    model = (
        f"{fp.model_class} ({fp.num_layers} layers, {fp.heads} heads, d={fp.head_dim})" if fp else "any model"
    )
    context = ", ".join(
        part
        for part in (
            c.resolution,
            f"{c.frames} frames" if c.frames else None,
            f"{c.steps} steps" if c.steps else None,
            f"CFG {c.cfg_mode}" if c.cfg_mode else None,
        )
        if part
    )
    return [model, context or "-"]


def _list(args: argparse.Namespace) -> int:
    from . import list_builtin

    for builtin in list_builtin():
        recipe = builtin.load()
        model, context = _describe(recipe)
        aliases = f" (alias: {', '.join(builtin.aliases)})" if builtin.aliases else ""
        print(f"{builtin.name}{aliases}")
        print(f"    model:      {model}")
        print(f"    context:    {context}")
        print(f"    settings:   threshold {recipe.threshold}, warm-up {recipe.warmup_steps}, order {recipe.order}, "
              f"{len(recipe.layers)} layer override(s)")
        notes = recipe.provenance.notes
        if not args.verbose and len(notes) > 160:
            notes = notes[:157].rsplit(" ", 1)[0] + "... (-v for all)"
        print(f"    provenance: {recipe.provenance.source}")
        if notes:
            print(textwrap.indent(textwrap.fill(notes, 100), " " * 16))
    return 0


def _show(args: argparse.Namespace) -> int:
    from . import dumps, resolve

    recipe = resolve(args.ref, revision=args.revision, cache_dir=args.cache_dir,
                     local_files_only=True if args.offline else None, token=args.token, recipes_repo=args.recipes_repo,
                     timeout=args.timeout)
    if recipe.provenance.hub_revision:
        print(f"# {args.ref} at commit {recipe.provenance.hub_revision}")
    print(dumps(recipe), end="")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from .hub import commit_of, default_recipes_repo, load_pulled, parse_ref, pull
    from .resolution import refuse_near_builtin

    refuse_near_builtin(args.ref)
    parsed = parse_ref(args.ref, revision=args.revision, recipes_repo=default_recipes_repo(args.recipes_repo))
    path = pull(parsed, cache_dir=args.cache_dir, local_files_only=True if args.offline else None, token=args.token,
                timeout=args.timeout)
    recipe = load_pulled(path, parsed, args.cache_dir)  # validate what was downloaded before reporting success
    commit = commit_of(path, parsed)
    print(f"{path}")
    print(f"# {recipe.name}: {parsed.repo_id} at commit {commit}; pin it with {parsed.repo_id}/{parsed.name}@{commit}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from . import push, resolve

    recipe = resolve(args.file)
    info = push(recipe, args.repo_id, name=args.name, token=args.token, revision=args.revision,
                private=args.private, commit_message=args.message, timeout=args.timeout)
    name = args.name or recipe.name
    print(f"pushed {name} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    print(f"use it with recipe=\"{args.repo_id}/{name}\" (pinned: \"{args.repo_id}/{name}@{info.oid}\")")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"list": _list, "show": _show, "pull": _pull, "push": _push}[args.recipes_command](args)
