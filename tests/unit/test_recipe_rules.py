"""One home per recipe rule: ``litepatch.apply``/``configure`` refuse exactly what ``litepatch.recipes``
refuses, with the same message, and the kernel's threshold check is the recipe's threshold rule.

Each bad input is tried through ``recipes.validate`` (recipe objects), ``recipes.load`` (YAML files),
``litepatch.apply(model, recipe=...)`` (objects and paths) and the keyword overrides of ``apply`` and
``LiteHandle.configure``; the model must be untouched after every refusal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_models as tm
import torch

import litepatch
from litepatch import LayerSetting, ModelFingerprint, Recipe, recipes
from litepatch.kernels import check_threshold, lite_attention
from litepatch.recipes import RecipeValidationError
from litepatch.recipes.schema import threshold_problem

ABOVE_ZERO = "must be <= 0 in log2 units (-10 conservative, 0 aggressive, -inf skips nothing; YAML: -.inf), got "
NAN = "is NaN; use a number <= 0 in log2 units (e.g. -6.0), or -inf (YAML: -.inf) to skip nothing"
NAN_VALUE = float("nan")

# (Recipe fields, the same as YAML lines, the message naming the field, the value and what is allowed)
BAD_RECIPES = [
    ({"threshold": 0.5}, "threshold: 0.5", "threshold " + ABOVE_ZERO + "0.5"),
    ({"threshold": math.inf}, "threshold: .inf", "threshold " + ABOVE_ZERO + "inf"),
    ({"threshold": NAN_VALUE}, "threshold: .nan", "threshold " + NAN),
    ({"threshold": "abc"}, "threshold: abc", "threshold: expected number, got a string of 3 characters"),
    ({"threshold": True}, "threshold: true", "threshold: expected number, got true/false"),
    ({"threshold": None}, "threshold: null", "threshold: expected number, got null"),
    ({"schedule": [-8.0, 1.0]}, "schedule: [-8.0, 1.0]", "schedule[1] " + ABOVE_ZERO + "1.0"),
    ({"schedule": [NAN_VALUE]}, "schedule: [.nan]", "schedule[0] " + NAN),
    ({"schedule": ["a"]}, "schedule: [a]", "schedule[0]: expected number, got a string of 1 character"),
    ({"schedule": -3}, "schedule: -3", "schedule: expected list of number, got an int"),
    ({"order": "descending"}, "order: descending", "order must be one of anchor, alternate, got a string of 10 characters"),
    ({"order": 3}, "order: 3", "order: expected string, got an int"),
    ({"warmup_steps": -1}, "warmup_steps: -1",
     "warmup_steps must be >= 0 (dense steps at the start of each generation), got -1"),
    ({"warmup_steps": True}, "warmup_steps: true", "warmup_steps: expected integer, got true/false"),
    ({"warmup_steps": 1.5}, "warmup_steps: 1.5", "warmup_steps: expected integer, got a float"),
    ({"layers": {"blocks.*": LayerSetting(threshold=2.0)}}, "layers: {'blocks.*': {threshold: 2.0}}",
     "layers.blocks.*.threshold " + ABOVE_ZERO + "2.0"),
    ({"layers": {"blocks.*": LayerSetting(threshold=NAN_VALUE)}}, "layers: {'blocks.*': {threshold: .nan}}",
     "layers.blocks.*.threshold " + NAN),
    ({"layers": {"blocks.*": LayerSetting(threshold="x")}}, "layers: {'blocks.*': {threshold: x}}",
     "layers.blocks.*.threshold: expected number, got a string of 1 character"),
    ({"layers": {"blocks.*": LayerSetting(schedule=[-1.0, 0.5])}}, "layers: {'blocks.*': {schedule: [-1.0, 0.5]}}",
     "layers.blocks.*.schedule[1] " + ABOVE_ZERO + "0.5"),
    ({"layers": {"": LayerSetting(dense=True)}}, "layers: {'': {dense: true}}", "layers: empty pattern"),
    ({"layers": {"blocks.*": LayerSetting(dense="yes")}}, "layers: {'blocks.*': {dense: 'yes'}}",
     "layers.blocks.*.dense: expected true/false, got a string of 3 characters"),
    ({"fingerprint": ModelFingerprint(layer_names=["blocks.0.self_attn"]),
      "layers": {"tb.*": LayerSetting(dense=True)}},
     "fingerprint: {layer_names: [blocks.0.self_attn]}\nlayers: {'tb.*': {dense: true}}",
     "layers pattern(s) 'tb.*' match no layer of the fingerprint"),
]
BAD_RECIPE_IDS = [message.split(" ")[0].rstrip(":") + f"-{i}" for i, (_, _, message) in enumerate(BAD_RECIPES)]

# (keyword overrides of apply/configure, the message)
BAD_OVERRIDES = [
    ({"threshold": 0.5}, "threshold " + ABOVE_ZERO + "0.5"),
    ({"threshold": math.inf}, "threshold " + ABOVE_ZERO + "inf"),
    ({"threshold": NAN_VALUE}, "threshold " + NAN),
    ({"threshold": "abc"}, "threshold: expected number, got a string of 3 characters"),
    ({"threshold": True}, "threshold: expected number, got true/false"),
    ({"threshold": np.float32(1.0)}, "threshold " + ABOVE_ZERO + "1.0"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0 (dense steps at the start of each generation), got -1"),
    ({"warmup_steps": True}, "warmup_steps: expected integer, got true/false"),
    ({"warmup_steps": 1.5}, "warmup_steps: expected integer, got a float"),
    ({"warmup_steps": "5"}, "warmup_steps: expected integer, got a string of 1 character"),
    ({"order": "backwards"}, "order must be one of anchor, alternate, got a string of 9 characters"),
    ({"order": 3}, "order: expected string, got an int"),
    ({"layers": {"blocks.*": 0.5}}, "layers.blocks.*.threshold " + ABOVE_ZERO + "0.5"),
    ({"layers": {"blocks.*": NAN_VALUE}}, "layers.blocks.*.threshold " + NAN),
    ({"layers": {"blocks.*": LayerSetting(schedule=[-1.0, 0.5])}},
     "layers.blocks.*.schedule[1] " + ABOVE_ZERO + "0.5"),
    ({"layers": {"": None}}, "layers: empty pattern"),
    ({"layers": {3: None}}, "layers: keys must be strings, got an int"),
]


def _instance_attrs(model):
    attrs = ("forward", "cache_context", "_litepatch", "_litepatch_root")
    return {n: sorted(k for k in vars(m) if k in attrs) for n, m in model.named_modules()}


def _message(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------ the recipe side


@pytest.mark.parametrize("fields, yaml_text, message", BAD_RECIPES, ids=BAD_RECIPE_IDS)
def test_validate_refuses_bad_recipe_objects(fields, yaml_text, message):
    with pytest.raises(RecipeValidationError) as err:
        recipes.validate(Recipe(name="bad", **fields))
    assert _message(err).startswith(message)


@pytest.mark.parametrize("fields, yaml_text, message", BAD_RECIPES, ids=BAD_RECIPE_IDS)
def test_load_refuses_bad_recipe_files(fields, yaml_text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"format_version: 1\nname: bad\n{yaml_text}\n")
    with pytest.raises(RecipeValidationError) as err:
        recipes.load(path)
    assert _message(err).startswith(f"{path}: {message}")


# ------------------------------------------------------------------------------- the front door side


@pytest.mark.parametrize("fields, yaml_text, message", BAD_RECIPES, ids=BAD_RECIPE_IDS)
def test_apply_refuses_bad_recipes_before_touching_the_model(fields, yaml_text, message, tmp_path):
    model, _ = tm.wan_style()
    before = _instance_attrs(model)
    with pytest.raises(RecipeValidationError) as err:
        litepatch.apply(model, recipe=Recipe(name="bad", **fields))
    assert _message(err).startswith(message)
    path = tmp_path / "bad.yaml"
    path.write_text(f"format_version: 1\nname: bad\n{yaml_text}\n")
    with pytest.raises(RecipeValidationError) as err:
        litepatch.apply(model, recipe=str(path))
    assert _message(err).startswith(f"{path}: {message}")
    assert _instance_attrs(model) == before


@pytest.mark.parametrize("kwargs, message", BAD_OVERRIDES)
def test_apply_and_configure_refuse_bad_overrides_with_the_recipe_message(kwargs, message):
    model, _ = tm.wan_style()
    before = _instance_attrs(model)
    with pytest.raises(RecipeValidationError) as err:
        litepatch.apply(model, **kwargs)
    assert _message(err).startswith(message)
    assert _instance_attrs(model) == before

    handle = litepatch.apply(model, threshold=-4.0)
    try:
        with pytest.raises(RecipeValidationError) as err:
            handle.configure(**kwargs)
        assert _message(err).startswith(message)
        assert handle.recipe.threshold == -4.0 and handle.recipe.layers == {}  # the patched model keeps its recipe
    finally:
        handle.remove()
    assert _instance_attrs(model) == before


@pytest.mark.parametrize(
    "layers, error, message",
    [
        (["blocks.*"], TypeError, "layers must be a dict of {pattern: LayerSetting | float}, got list"),
        ({"blocks.*": "x"}, TypeError, "layers['blocks.*'] must be a LayerSetting, a threshold (float) or None"),
        ({"blocks.9.*": -1.0}, ValueError, "layers pattern(s) 'blocks.9.*' match no self/joint attention layer"),
    ],
)
def test_layers_shorthand_and_model_patterns(layers, error, message):
    model, _ = tm.wan_style()
    before = _instance_attrs(model)
    with pytest.raises(error) as err:
        litepatch.apply(model, layers=layers)
    assert _message(err).startswith(message)
    assert _instance_attrs(model) == before


def test_overrides_accept_numbers_and_keep_the_recipe_fields():
    model, _ = tm.wan_style()
    handle = litepatch.apply(model, threshold=np.float32(-6.0), warmup_steps=0, order="alternate",
                             layers={"blocks.0.*": -math.inf, "blocks.1.*": None})
    try:
        recipe = handle.recipe
        assert type(recipe.threshold) is float and recipe.threshold == -6.0 and recipe.order == "alternate"
        assert recipe.threshold_for("blocks.0.self_attn", 3) == -math.inf
        assert recipe.threshold_for("blocks.1.self_attn", 3) is None
        assert handle.configure(threshold=0).threshold == 0.0  # 0 is the most aggressive threshold allowed
    finally:
        handle.remove()


# ------------------------------------------------------------------------ one threshold rule, one text


@pytest.mark.parametrize("value", [0.5, math.inf, NAN_VALUE, "abc", True, None, np.float32(2.0)])
def test_kernel_check_and_recipe_validation_share_the_threshold_rule(value):
    with pytest.raises(ValueError) as kernel:
        check_threshold(value)
    assert str(kernel.value) == threshold_problem(value, "threshold")
    q = torch.randn(1, 16, 1, 16)
    with pytest.raises(ValueError) as op:
        lite_attention(q, q, q, threshold=value)
    assert str(op.value) == str(kernel.value)
    if not isinstance(value, np.floating):  # recipe fields take Python numbers only
        with pytest.raises(RecipeValidationError) as recipe:
            recipes.validate(Recipe(threshold=value))
        assert str(recipe.value) == str(kernel.value)


@pytest.mark.parametrize("value", [0, -0.0, -6, -6.5, -math.inf, np.float32(-3.0)])
def test_valid_thresholds_pass_everywhere(value):
    assert threshold_problem(value) is None
    assert check_threshold(value) == float(value)
    if not isinstance(value, np.floating):
        assert recipes.validate(Recipe(threshold=value)).threshold == value


def test_allow_fingerprint_mismatch_reaches_the_layer_pattern_rule():
    # one rule, one error type: a pattern matching no layer is a FingerprintMismatchError that the flag turns into
    # a warning, as it does for every other difference from the model
    model, _ = tm.wan_style()
    with pytest.raises(recipes.FingerprintMismatchError, match=r"'blocks\.9\.\*' match no self/joint attention layer"):
        litepatch.apply(model, layers={"blocks.9.*": -1.0})
    with pytest.warns(UserWarning, match=r"'blocks\.9\.\*' match no self/joint attention layer.*applied anyway"):
        handle = litepatch.apply(model, layers={"blocks.9.*": -1.0}, allow_fingerprint_mismatch=True)
    try:
        with pytest.warns(UserWarning, match="applied anyway"):  # configure allows what apply allowed
            handle.configure(layers={"blocks.8.*": None})
    finally:
        handle.remove()
    handle = litepatch.apply(model)
    try:
        with pytest.raises(recipes.FingerprintMismatchError, match=r"'blocks\.8\.\*' match no"):
            handle.configure(layers={"blocks.8.*": None})
    finally:
        handle.remove()
