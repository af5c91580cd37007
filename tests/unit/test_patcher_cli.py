"""``litepatch inspect``: the table of litepatch.inspect() for a factory or a diffusers class."""

from __future__ import annotations

import argparse
import json

import pytest

from litepatch import inspect_cli


def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    inspect_cli.add_arguments(parser)
    code = inspect_cli.run(parser.parse_args(argv))
    return code, capsys.readouterr().out


def test_inspect_factory_prints_the_table(capsys):
    code, out = _run(["--model", "tiny_models:wan_style"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["name", "kind", "sparse", "heads"]
    assert any(line.split()[:3] == ["blocks.0.self_attn", "self", "yes"] for line in lines)
    assert any(line.split()[:3] == ["blocks.1.cross_attn", "cross", "no"] for line in lines)
    assert lines[-1] == "4 attention layers, 2 made sparse by litepatch"


def test_inspect_diffusers_class_with_config_as_json(capsys):
    pytest.importorskip("diffusers")
    config = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16}
    code, out = _run(["--diffusers", "WanTransformer3DModel", "--config", json.dumps(config), "--json"], capsys)
    assert code == 0
    records = json.loads(out)
    assert [(r["name"], r["kind"], r["heads"], r["head_dim"]) for r in records] == [
        ("blocks.0.attn1", "self", 2, 16), ("blocks.0.attn2", "cross", 2, 16)]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--model", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
        (["--model", "tiny_models"], "MODULE:FACTORY"),
        (["--model", "tiny_models:nope"], "has no attribute 'nope'"),
        (["--diffusers", "NoSuchTransformer"], "diffusers has no model class 'NoSuchTransformer'"),
        (["--diffusers", "WanTransformer3DModel", "--config", "{bad"], "--config is not valid JSON"),
        (["--diffusers", "WanTransformer3DModel", "--config", '{"no_such_arg": 1}'], "cannot build"),
    ],
)
def test_inspect_user_errors_are_one_clear_value_error(argv, match, capsys):
    if "--diffusers" in argv:
        pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match=match):
        _run(argv, capsys)


def test_inspect_shows_layers_out_of_reach_with_the_fix(capsys):
    code, out = _run(["--model", "tiny_models:timm_unfused"], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("blocks.1.attn"))
    assert "OUT OF REACH" in row and "fused_attn = True" in row
    assert out.splitlines()[-1] == "2 attention layers, 1 made sparse by litepatch"


def test_inspect_settings_without_save_recipe_are_refused(capsys):
    with pytest.raises(ValueError, match="go with --save-recipe"):
        _run(["--model", "tiny_models:wan_style", "--threshold", "-4"], capsys)
