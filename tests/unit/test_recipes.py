"""Recipes on disk: safe loading, strict validation, built-ins, resolution order and fingerprints."""

import math
from pathlib import Path

import pytest

from litepatch import recipes
from litepatch.recipes import (
    FingerprintMismatchError,
    LayerSetting,
    ModelFingerprint,
    Recipe,
    RecipeError,
    RecipeNotFoundError,
    RecipeValidationError,
)

WAN14 = ModelFingerprint("WanTransformer3DModel", 40, 40, 128, [f"blocks.{i}.attn1" for i in range(40)])
WAN13 = ModelFingerprint("WanTransformer3DModel", 30, 12, 128, [f"blocks.{i}.attn1" for i in range(30)])
HEADER = "format_version: 1\n"


# ------------------------------------------------------------------------------------------ built-ins


def test_builtins_load_with_their_file_name_and_published_provenance():
    builtins = {b.name: b for b in recipes.list_builtin()}
    assert {"wan2.1-14b-720p", "wan2.1-14b-480p", "wan2.1-1.3b-480p"} <= set(builtins)
    for name, builtin in builtins.items():
        recipe = builtin.load()
        assert recipe.name == name
        assert recipes.loads(recipes.dumps(recipe)) == recipe
        if name.startswith("wan"):
            assert recipe.provenance.source == "published-defaults"
            assert recipe.threshold == -10.0 and recipe.warmup_steps == 0
            notes = recipe.provenance.notes
            assert "threshold -10.0" in notes and "README" in notes and "not measured by litepatch" in notes


@pytest.mark.parametrize(
    "name, fingerprint, resolution",
    [("wan2.1-14b-720p", WAN14, "1280x720"), ("wan2.1-14b-480p", WAN14, "832x480"),
     ("wan2.1-1.3b-480p", WAN13, "832x480")],
)
def test_builtin_wan_fingerprints(name, fingerprint, resolution):
    recipe = recipes.resolve(name)
    assert recipe.fingerprint == fingerprint
    assert recipe.context.resolution == resolution
    assert recipes.check_fingerprint(recipe, fingerprint) == []


def test_wan_fingerprint_layer_names_are_the_diffusers_self_attention_modules():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )
    names = [n for n, m in model.named_modules() if n.endswith(".attn1")]
    assert names == [f"blocks.{i}.attn1" for i in range(3)]
    assert all(model.get_submodule(n.replace("attn1", "attn2")) is not None for n in names)  # attn2 = cross
    assert model.config.num_attention_heads * model.config.attention_head_dim == 32


def test_aliases_pick_the_builtin_that_fits_the_model():
    assert recipes.resolve("wan-720p").name == "wan2.1-14b-720p"
    assert recipes.resolve("wan-480p").name == "wan2.1-14b-480p"
    assert recipes.resolve("wan-480p", fingerprint=WAN13).name == "wan2.1-1.3b-480p"
    assert recipes.resolve("wan-480p", fingerprint=WAN14).name == "wan2.1-14b-480p"
    assert {"wan-480p", "wan-720p", "wan2.1-14b-720p"} <= set(recipes.builtin_names())


def test_builtin_with_a_revision_is_refused():
    with pytest.raises(RecipeValidationError, match="built-in recipe and has no revisions"):
        recipes.resolve("wan-720p", revision="v1")


# ---------------------------------------------------------------------------------------- loads errors


@pytest.mark.parametrize(
    "text, message",
    [
        ("foo: 1\n", "unknown key at the top level: a string of 3 characters; allowed keys: format_version, name,"),
        (HEADER + "context: {fps: 16}\n", "unknown key in context: a string of 3 characters; allowed keys: resolution, frames, steps"),
        (HEADER + "layers: {'blocks.*': {thresh: -3}}\n", "unknown key in layers.blocks.*: a string of 6 characters (did you mean 'threshold'?); allowed keys:"),
        (HEADER + "warmup_steps: '5'\n", "warmup_steps: expected integer, got a string of 1 character"),
        (HEADER + "warmup_steps: true\n", "warmup_steps: expected integer, got true/false"),
        (HEADER + "threshold: abc\n", "threshold: expected number, got a string of 3 characters"),
        (HEADER + "layers: {x: {schedule: [-1, a]}}\n", "layers.x.schedule[1]: expected number, got a string of 1 character"),
        (HEADER + "fingerprint: {heads: 1.5}\n", "fingerprint.heads: expected integer, got a float"),
        (HEADER + "schedule: -3\n", "schedule: expected list of number, got an int"),
        ("name: x\n", "missing 'format_version'; add 'format_version: 1'"),
        ("format_version: 2\n", "format_version 2 is newer than this litepatch reads (1); upgrade litepatch"),
        ("format_version: 0\n", "format_version must be >= 1, got 0"),
        (HEADER + "threshold: .nan\n", "threshold is NaN"),
        (HEADER + "threshold: 0.5\n", "threshold must be <= 0 in log2 units"),
        (HEADER + "threshold: .inf\n", "threshold must be <= 0 in log2 units"),
        (HEADER + "schedule: [-8, 1]\n", "schedule[1] must be <= 0"),
        (HEADER + "layers: {'blocks.0.*': {threshold: 2}}\n", "layers.blocks.0.*.threshold must be <= 0"),
        (HEADER + "warmup_steps: -1\n", "warmup_steps must be >= 0"),
        (HEADER + "order: descending\n", "order must be one of anchor, alternate, got a string of 10 characters"),
        (HEADER + "context: {cfg_mode: parallel}\n", "context.cfg_mode must be one of sequential, batched, none"),
        (HEADER + "context: {steps: 0}\n", "context.steps must be >= 1"),
        (HEADER + "provenance: {source: magic}\n", "provenance.source must be one of calibration"),
        (HEADER + "measured: {kept_fraction: 1.5}\n", "measured.kept_fraction must be in [0, 1]"),
        (HEADER + "name: ../evil\n", "recipe name (a string of 7 characters) contains a path"),
        (HEADER + "name: 'a\\\\b'\n", "contains a path"),
        (HEADER + "name: /etc/passwd\n", "contains a path"),
        (HEADER + "name: 'bad name'\n", "is not a valid name"),
        (HEADER + "fingerprint: {num_layers: 2, layer_names: [a]}\n", "num_layers is 2 but layer_names lists 1"),
        (HEADER + "fingerprint: {layer_names: [a, a]}\n", "layer_names lists a more than once"),
        (HEADER + "fingerprint: {layer_names: [blocks.0.attn1]}\nlayers: {'tb.*': {dense: true}}\n",
         "layers pattern(s) 'tb.*' match no layer of the fingerprint"),
        ("!!python/object/apply:os.system ['true']\n", "line 1: YAML tag: recipes hold plain values only"),
        (HEADER + "name: !!python/name:os.system\n", "line 2: YAML tag"),
        (HEADER + "name: ${oc.env:HOME}\n", "name: contains an interpolation"),
        (HEADER + "description: 'x ${now:}'\n", "contains an interpolation"),
        (HEADER + "layers: {'${x}': {dense: true}}\n", "a key contains an interpolation"),
        (HEADER + "description: &a hello\nname: *a\n", "line 2: YAML anchor: recipes do not use anchors or aliases"),
        (HEADER + "name: a\nname: b\n", "line 3: duplicate key; keep only one"),
        ("- 1\n- 2\n", "a recipe is a YAML mapping"),
        ("format_version: [\n", "not a valid recipe YAML file"),
        (b"format_version: 1\nname: \xff\n", "not UTF-8 text"),
    ],
)
def test_loads_refuses_with_a_message_naming_the_problem(text, message):
    with pytest.raises(RecipeValidationError) as info:
        recipes.loads(text, source="r.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("r.yaml: ")
    assert "\n" not in str(info.value)


def test_loads_refuses_large_input_before_parsing(monkeypatch):
    calls = []
    monkeypatch.setattr("yaml.load", lambda *a, **k: calls.append(a))
    text = HEADER + "description: '" + "x" * recipes.MAX_RECIPE_BYTES + "'\n"
    with pytest.raises(RecipeValidationError, match=r"larger than the 262144-byte limit"):
        recipes.loads(text)
    assert calls == []


def test_loads_accepts_minus_inf_and_resolves_thresholds():
    recipe = recipes.loads(
        HEADER
        + "name: mine\nthreshold: -6\nwarmup_steps: 2\nschedule: [-8.0, -7.0]\n"
        + "layers:\n  'blocks.0.*': {dense: true}\n  'blocks.1.*': {threshold: -.inf}\n"
        + "  'blocks.2.*': {schedule: [-3.0, -2.0]}\n"
    )
    assert recipe.threshold_for("blocks.5.attn1", 0) == -8.0
    assert recipe.threshold_for("blocks.5.attn1", 9) == -7.0
    assert recipe.threshold_for("blocks.0.attn1", 9) is None
    assert recipe.threshold_for("blocks.1.attn1", 0) == -math.inf
    assert recipe.threshold_for("blocks.2.attn1", 1) == -2.0
    text = recipes.dumps(recipe)
    assert "-.inf" in text
    assert recipes.loads(text) == recipe


def test_thresholds_follow_layer_settings_changed_in_place():
    """Which patterns match a layer is remembered (a forward asks for every layer), never what they set."""
    from litepatch.recipes.schema import LayerSetting, Recipe

    recipe = Recipe(threshold=-6.0, layers={"blocks.1.*": LayerSetting(threshold=-3.0)})
    assert recipe.threshold_for("blocks.1.attn1", 0) == -3.0
    recipe.layers["blocks.1.*"].threshold = -4.0
    assert recipe.threshold_for("blocks.1.attn1", 0) == -4.0
    recipe.layers["blocks.*"] = LayerSetting(dense=True)  # a pattern added after the first question
    assert recipe.threshold_for("blocks.1.attn1", 0) is None
    del recipe.layers["blocks.*"]
    recipe.layers["blocks.1.*"].schedule = [-9.0, -8.0]
    assert recipe.threshold_for("blocks.1.attn1", 1) == -8.0 and recipe.threshold_for("blocks.2.attn1", 1) == -6.0


def test_validate_checks_recipe_objects():
    assert recipes.validate(Recipe(name="ok", threshold=-3)).name == "ok"
    with pytest.raises(RecipeValidationError, match="threshold is NaN"):
        recipes.validate(Recipe(threshold=float("nan")))
    with pytest.raises(RecipeValidationError, match="contains a path"):
        recipes.validate(Recipe(name="a/b"))
    with pytest.raises(RecipeValidationError, match="layers.x.dense: expected true/false, got a string of 3 characters"):
        recipes.validate(Recipe(layers={"x": LayerSetting(dense="yes")}))
    with pytest.raises(RecipeValidationError, match="expected a litepatch Recipe, got dict"):
        recipes.validate({"name": "x"})
    assert issubclass(RecipeValidationError, ValueError) and issubclass(RecipeNotFoundError, RecipeError)


# --------------------------------------------------------------------------------------- load / save


def test_save_then_load_round_trip(tmp_path):
    recipe = Recipe(name="mine", threshold=-4.0, warmup_steps=3, fingerprint=WAN13,
                    layers={"blocks.0.*": LayerSetting(dense=True)})
    path = recipes.save(recipe, tmp_path / "sub" / "mine.yaml")
    assert path.read_text().startswith("format_version: 1\n")
    assert recipes.load(path) == recipe
    assert recipes.load(str(path)) == recipe
    assert [p.name for p in path.parent.iterdir()] == ["mine.yaml"]  # no temporary file left


def test_save_refuses_an_invalid_recipe_and_writes_nothing(tmp_path):
    with pytest.raises(RecipeValidationError, match="warmup_steps must be >= 0"):
        recipes.save(Recipe(warmup_steps=-2), tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()


def test_load_errors(tmp_path):
    with pytest.raises(RecipeNotFoundError, match="recipe file '.*missing.yaml' does not exist; check the path"):
        recipes.load(tmp_path / "missing.yaml")
    with pytest.raises(RecipeNotFoundError, match="is a directory, not a regular file; pass the .yaml file itself"):
        recipes.load(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (recipes.MAX_RECIPE_BYTES + 1))
    with pytest.raises(RecipeValidationError, match="larger than the 262144-byte limit"):
        recipes.load(big)
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEADER + "treshold: -3\n")
    with pytest.raises(RecipeValidationError, match=r"bad.yaml: unknown key at the top level: a string of 8 characters \(did you mean 'threshold'\?\)"):
        recipes.load(bad)


# ------------------------------------------------------------------------------------------ resolve


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if resolution reaches the Hub."""
    from litepatch.recipes import hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected Hub lookup {args}")

    monkeypatch.setattr(hub, "pull", refuse)


def test_resolve_order_object_path_builtin(tmp_path, monkeypatch, no_hub):
    recipe = Recipe(name="obj", threshold=-2.0)
    assert recipes.resolve(recipe) is recipe
    path = recipes.save(Recipe(name="local", threshold=-5.0), tmp_path / "local.yaml")
    assert recipes.resolve(path).name == "local"
    assert recipes.resolve(str(path)).name == "local"
    # a local file wins over a built-in of the same name
    monkeypatch.chdir(tmp_path)
    recipes.save(Recipe(name="shadow"), tmp_path / "wan-720p")
    assert recipes.resolve("wan-720p").name == "shadow"
    (tmp_path / "wan-720p").unlink()
    assert recipes.resolve("wan-720p").name == "wan2.1-14b-720p"


@pytest.mark.parametrize("ref", ["missing.yaml", "./missing", "dir/missing.yml", "~/nope.yaml", "/abs/nope"])
def test_resolve_path_like_refs_never_go_to_the_hub(ref, no_hub):
    with pytest.raises(RecipeNotFoundError, match="does not exist; check the path"):
        recipes.resolve(ref)


@pytest.mark.parametrize(
    "ref, message",
    [
        ("org/repo/../x", "contains '..' or '.' path parts"),
        ("org/../name", "contains '..' or '.' path parts"),
        ("a/b/c/d", "is neither a name, a path to an existing .yaml file nor 'org/repo/name[@revision]'"),
        ("org/repo/x@", "revision '' is not a valid branch"),
        ("org/repo/x@a b", "is not a valid branch"),
        ("org/re po/x", "is not of the form 'org/repo'"),
        ("org/repo/bad name", "recipe name in the Hub reference (a string of 8 characters) is not a valid name"),
        (12, "recipe must be a Recipe, a path, a built-in name or 'org/repo/name[@revision]', got int"),
    ],
)
def test_resolve_refuses_malformed_refs(ref, message, no_hub):
    with pytest.raises(RecipeValidationError) as info:
        recipes.resolve(ref)
    assert message in str(info.value)


def _fake_pull(monkeypatch, tmp_path):
    from litepatch.recipes import hub

    seen = []

    def fake_pull(parsed, **kwargs):
        seen.append((parsed, kwargs))
        folder = hub.repo_cache_folder(parsed, kwargs["cache_dir"])
        return recipes.save(Recipe(name=parsed.name), folder / "snapshots" / ("a" * 40) / parsed.filename)

    monkeypatch.setattr(hub, "pull", fake_pull)
    return seen


def test_resolve_hub_refs_and_default_repository(tmp_path, monkeypatch):
    seen = _fake_pull(monkeypatch, tmp_path)
    monkeypatch.delenv(recipes.RECIPES_REPO_ENV, raising=False)
    cache = str(tmp_path / "c")
    recipe = recipes.resolve("org/repo/mine@v2", cache_dir=cache, token="t")
    assert recipe.name == "mine" and recipe.provenance.hub_revision == "a" * 40
    parsed, kwargs = seen[-1]
    assert (parsed.repo_id, parsed.name, parsed.revision) == ("org/repo", "mine", "v2")
    assert kwargs == {"cache_dir": cache, "local_files_only": None, "token": "t", "timeout": None}
    recipes.resolve("shared", revision="main", cache_dir=cache)
    assert (seen[-1][0].repo_id, seen[-1][0].revision) == (recipes.DEFAULT_RECIPES_REPO, "main")
    monkeypatch.setenv(recipes.RECIPES_REPO_ENV, "team/recipes")
    recipes.resolve("shared", cache_dir=cache)
    assert seen[-1][0].repo_id == "team/recipes"
    recipes.resolve("shared", recipes_repo="other/place", cache_dir=cache)
    assert seen[-1][0].repo_id == "other/place"
    with pytest.raises(RecipeValidationError, match="pins revision 'v1' but revision='v2' was passed"):
        recipes.resolve("org/repo/mine@v1", revision="v2")


def test_resolve_unknown_short_name_lists_builtins(monkeypatch):
    from litepatch.recipes import hub

    def not_found(parsed, **kwargs):
        raise RecipeNotFoundError(f"recipe {parsed.name!r} not found in Hub repository {parsed.repo_id!r}")

    monkeypatch.setattr(hub, "pull", not_found)
    with pytest.raises(RecipeNotFoundError) as info:
        recipes.resolve("team-recipe")
    message = str(info.value)
    assert "'team-recipe' is neither a local file, a built-in recipe nor in the default Hub repository" in message
    assert "known built-in recipes: " in message and "wan-480p, wan-720p, wan2.1-1.3b-480p" in message
    assert "wan-720p" in info.value.known


# -------------------------------------------------------------------------------------- fingerprints


def test_check_fingerprint_accepts_the_right_model_and_any_model_without_fingerprint():
    assert recipes.check_fingerprint(recipes.resolve("wan-720p"), WAN14) == []
    assert recipes.check_fingerprint(Recipe(), WAN13) == []
    assert recipes.check_fingerprint(recipes.resolve("wan-720p"), vars(WAN14)) == []


def test_check_fingerprint_names_every_difference():
    recipe = recipes.resolve("wan2.1-14b-720p")
    model = ModelFingerprint("CogVideoXTransformer3DModel", 30, 48, 64,
                             [f"blocks.{i}.attn1" for i in range(29)] + ["transformer_blocks.0.attn1"])
    with pytest.raises(FingerprintMismatchError) as info:
        recipes.check_fingerprint(recipe, model)
    message = str(info.value)
    assert "recipe 'wan2.1-14b-720p' was made for a different model than CogVideoXTransformer3DModel" in message
    assert "class: recipe WanTransformer3DModel, model CogVideoXTransformer3DModel" in message
    assert "attention layer count: recipe 40, model 30" in message
    assert "heads: recipe 40, model 48" in message
    assert "head dim: recipe 128, model 64" in message
    assert "layers in the recipe but not in the model: blocks.29.attn1, blocks.30.attn1" in message
    assert "(11 in all)" in message
    assert "layers in the model but not in the recipe: transformer_blocks.0.attn1" in message
    assert "allow_fingerprint_mismatch=True" in message
    assert len(info.value.differences) == 6


def test_check_fingerprint_compares_only_what_the_recipe_records():
    recipe = Recipe(fingerprint=ModelFingerprint(model_class="WanTransformer3DModel"))
    assert recipes.check_fingerprint(recipe, WAN13) == []
    recipe = Recipe(fingerprint=ModelFingerprint(heads=12))
    with pytest.raises(FingerprintMismatchError, match="heads: recipe 12, model 40"):
        recipes.check_fingerprint(recipe, WAN14)


def test_check_fingerprint_refuses_patterns_that_match_no_layer():
    recipe = Recipe(layers={"transformer_blocks.*": LayerSetting(dense=True), "blocks.0.*": LayerSetting(dense=True)})
    with pytest.raises(FingerprintMismatchError, match=r"pattern\(s\) 'transformer_blocks.\*' match no self/joint "
                                                        r"attention layer of WanTransformer3DModel"):
        recipes.check_fingerprint(recipe, WAN13)


def test_check_fingerprint_allow_mismatch_warns_instead():
    with pytest.warns(UserWarning, match=r"heads: recipe 40, model 12.*applied anyway: allow_mismatch=True"):
        diffs = recipes.check_fingerprint(recipes.resolve("wan2.1-14b-480p"), WAN13, allow_mismatch=True)
    assert any(d.startswith("heads:") for d in diffs)


def test_builtin_dir_ships_only_yaml():
    files = sorted(p.name for p in Path(recipes.catalog.BUILTIN_DIR).iterdir() if not p.name.startswith("."))
    assert files and all(f.endswith(".yaml") for f in files)
