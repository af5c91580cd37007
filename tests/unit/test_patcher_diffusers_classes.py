"""Every model class of the installed diffusers' ``models/transformers/`` (issue 13): found and classified.

Each class is built at its default config (tiny overrides where the defaults cannot build) on the meta
device, so no weights are allocated, and ``litepatch.inspect`` must give exactly the layer kinds of
:data:`EXPECTED` (layer names with block indices as ``*``). A class this file does not know fails
``test_every_transformer_class_is_known``: a diffusers upgrade that adds a family is noticed.
Independently of the adapters, every module whose class name ends in ``Attention``/``Attn`` must be found
or hold / sit inside a found layer. Forward checks on tiny configs live in ``test_patcher_models.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import warnings

import pytest
import torch

import litepatch

diffusers = pytest.importorskip("diffusers")

S, X, J, NA, OUT = "self", "cross", "joint", "not applicable", "out of reach"

# Constructor kwargs for the classes whose defaults do not build (None where a size must be given).
CONFIGS = {
    "HunyuanDiT2DModel": dict(in_channels=4, patch_size=2),
    "EasyAnimateTransformer3DModel": dict(in_channels=16, out_channels=16, patch_size=2),
    "LatteTransformer3DModel": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=16, patch_size=2, video_length=4, caption_channels=32,
                                    cross_attention_dim=32),
    "LuminaNextDiT2DModel": dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                                 num_attention_heads=2, num_kv_heads=2, cross_attention_dim=32),
    "HiDreamImageTransformer2DModel": dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                           num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                           caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=2,
                                           num_activated_experts=1, axes_dims_rope=(4, 6, 6),
                                           max_resolution=(32, 32), llama_layers=[0, 1]),
    "OmniGenTransformer2DModel": dict(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, num_layers=2, vocab_size=100,
                                      max_position_embeddings=64, original_max_position_embeddings=64,
                                      rope_scaling={"long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
                                      pos_embed_max_size=32, time_step_dim=16),
    "TransformerTemporalModel": dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=1,
                                     cross_attention_dim=32),
    "Transformer2DModel": dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=1,
                               cross_attention_dim=32),
    "DreamLiteTransformer2DModel": dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=1,
                                        cross_attention_dim=32),
}
# Classes that cannot be built without a checkpoint-sized config this test does not guess; each names why.
NOT_BUILT = {
    "OmniGenTransformer2DModel": "its rope scaling config needs checkpoint values; attention is diffusers Attention",
}

# Attention-named modules without softmax attention that no adapter lists (gated delta-net linear attention).
NO_SOFTMAX = {"SanaWMBidirectionalGDNAttention", "SanaWMBidirectionalGDNCamAttention"}

# class -> {layer pattern: kind}; see the module docstring. Reviewed by reading each model's code where noted in
# README's table; the others record what the adapters find (a change is then a deliberate edit here).
EXPECTED: dict[str, dict[str, str]] = {}  # filled below


def pattern_of(name: str) -> str:
    """A layer name with its block indices as ``*`` (``blocks.3.attn1`` -> ``blocks.*.attn1``)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def transformer_classes() -> dict[str, type]:
    from diffusers.models.modeling_utils import ModelMixin

    import diffusers.models.transformers as package

    classes = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, ModelMixin) and value.__module__ == module.__name__:
                classes[name] = value
    return classes


CLASSES = transformer_classes()


def test_every_transformer_class_is_known():
    unknown = sorted(set(CLASSES) - set(EXPECTED) - set(NOT_BUILT))
    assert not unknown, (f"diffusers {diffusers.__version__} has transformer classes this test does not know: "
                         f"{unknown}; classify them in EXPECTED")
    gone = sorted((set(EXPECTED) | set(NOT_BUILT)) - set(CLASSES))
    assert not gone, f"classes no longer in diffusers {diffusers.__version__}: {gone}"


def _build(cls: type) -> torch.nn.Module:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return cls(**CONFIGS.get(cls.__name__, {}))


@pytest.mark.parametrize("name", sorted(set(CLASSES) - set(NOT_BUILT)))
def test_every_attention_layer_found_and_classified(name):
    model = _build(CLASSES[name])
    infos = litepatch.inspect(model)
    found = {}
    for info in infos:
        kind = OUT if info.out_of_reach else info.kind
        assert found.setdefault(pattern_of(info.name), kind) == kind, f"{info.name}: kinds differ within a pattern"
        assert info.sparse == (kind in (S, J) and info.text_layout != "interleaved"), info
        assert info.reason
        if kind == J:
            assert info.text_layout in ("first", "last", "unknown", "interleaved")
    assert found == EXPECTED[name]
    names = [info.name for info in infos]
    for module_name, module in model.named_modules():
        if re.search(r"(Attention|Attn)\d*$", type(module).__name__) and type(module).__name__ not in NO_SOFTMAX:
            covered = any(module_name == n or module_name.startswith(n + ".") or n.startswith(module_name + ".")
                          for n in names)
            assert covered, f"{module_name} ({type(module).__name__}) is attention that no adapter found"


EXPECTED.update({
    'HunyuanDiT2DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X},
    'EasyAnimateTransformer3DModel': {'transformer_blocks.*.attn1': J},
    'AceStepTransformer1DModel': {'layers.*.self_attn': S, 'layers.*.cross_attn': X},
    'AuraFlowTransformer2DModel': {'joint_transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'CogVideoXTransformer3DModel': {'transformer_blocks.*.attn1': J},
    'ConsisIDTransformer3DModel': {'transformer_blocks.*.attn1': J},
    'DiTTransformer2DModel': {'transformer_blocks.*.attn1': S},
    'LatteTransformer3DModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': X,
                                'temporal_transformer_blocks.*.attn1': S},
    'LuminaNextDiT2DModel': {'layers.*.attn1': S, 'layers.*.attn2': X},
    'PixArtTransformer2DModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': X},
    'PriorTransformer': {'transformer_blocks.*.attn1': S},
    'SanaTransformer2DModel': {'transformer_blocks.*.attn1': NA, 'transformer_blocks.*.attn2': X},
    'StableAudioDiTModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': X},
    'Transformer2DModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': X},
    'DreamLiteTransformer2DModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': X},
    'AllegroTransformer3DModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': X},
    'ChromaTransformer2DModel': {'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'CogView3PlusTransformer2DModel': {'transformer_blocks.*.attn1': J},
    'CogView4Transformer2DModel': {'transformer_blocks.*.attn1': J},
    'FluxTransformer2DModel': {'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'Flux2Transformer2DModel': {'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'HiDreamImageTransformer2DModel': {'double_stream_blocks.*.block.attn1': J,
                                       'single_stream_blocks.*.block.attn1': J},
    'HunyuanVideoTransformer3DModel': {'context_embedder.token_refiner.refiner_blocks.*.attn': S,
                                       'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'HunyuanVideoFramepackTransformer3DModel': {'context_embedder.token_refiner.refiner_blocks.*.attn': S,
                                                'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'LTXVideoTransformer3DModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': X},
    'Lumina2Transformer2DModel': {'noise_refiner.*.attn': S, 'context_refiner.*.attn': S, 'layers.*.attn': J},
    'MochiTransformer3DModel': {'time_embed.pooler': X, 'transformer_blocks.*.attn1': J},
    'QwenImageTransformer2DModel': {'transformer_blocks.*.attn': J},
    'SanaVideoTransformer3DModel': {'transformer_blocks.*.attn1': NA, 'transformer_blocks.*.attn2': X},
    'SD3Transformer2DModel': {'transformer_blocks.*.attn': J},
    'SkyReelsV2Transformer3DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X},
    'WanTransformer3DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X},
    'WanVACETransformer3DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X, 'vace_blocks.*.attn1': S,
                                  'vace_blocks.*.attn2': X},
})
# Recorded as the adapters classify them (not yet checked against a forward run; see README's table).
EXPECTED.update({
    'MiniMaxMusic3RVQDepthDecoder': {'layers.*.attn': S},
    'T5FilmDecoder': {'decoders.*.layer.*.attention': OUT},
    'AnyFlowTransformer3DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X},
    'AnyFlowFARTransformer3DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X},
    'BriaTransformer2DModel': {'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'BriaFiboTransformer2DModel': {'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'BriaFibo2Transformer2DModel': {
        'noise_refiner.*.attention': S,
        'perceiver.layers.*.cross_attention': X,
        'perceiver.layers.*.self_attention': S,
        'layers.*.attention': S,
        'layers.*.cross_attention': X,
    },
    'ChronoEditTransformer3DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X},
    'CosmosTransformer3DModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': X},
    'Cosmos3OmniTransformer': {'layers.*.self_attn': J},
    'ErnieImageTransformer2DModel': {'layers.*.self_attention': S},
    'Flux3Transformer2DModel': {
        'mode_blocks.image.*.attn': S,
        'mode_blocks.image_cond.*.attn': S,
        'txt_mode_blocks.*.attn': S,
        'single_transformer_blocks.*.attn': J,
    },
    'GlmImageTransformer2DModel': {'transformer_blocks.*.attn1': S},
    'HeliosTransformer3DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X},
    'HunyuanVideo15Transformer3DModel': {
        'context_embedder.token_refiner.refiner_blocks.*.attn': S,
        'transformer_blocks.*.attn': J,
    },
    'HunyuanImageTransformer2DModel': {
        'context_embedder.token_refiner.refiner_blocks.*.attn': S,
        'transformer_blocks.*.attn': J,
        'single_transformer_blocks.*.attn': J,
    },
    'Ideogram4Transformer2DModel': {'layers.*.attention': S},
    'JoyImageEditTransformer3DModel': {'double_blocks.*.attn': S},
    'JoyImageEditPlusTransformer3DModel': {'double_blocks.*.attn': S},
    'Kandinsky5Transformer3DModel': {
        'text_transformer_blocks.*.self_attention': S,
        'visual_transformer_blocks.*.self_attention': S,
        'visual_transformer_blocks.*.cross_attention': X,
    },
    'Kandinsky6Transformer3DModel': {
        'video_text_transformer_blocks.*.attn': S,
        'audio_text_transformer_blocks.*.attn': S,
        'visual_transformer_blocks.*.video_dec_block.self_attention': S,
        'visual_transformer_blocks.*.video_dec_block.cross_attention': X,
        'visual_transformer_blocks.*.audio_dec_block.self_attention': S,
        'visual_transformer_blocks.*.audio_dec_block.cross_attention': X,
        'visual_transformer_blocks.*.va_cross_attention': X,
        'visual_transformer_blocks.*.av_cross_attention': X,
    },
    'Kandinsky6SRTransformer3DModel': {'visual_transformer_blocks.*.self_attention': S},
    'Krea2Transformer2DModel': {
        'text_fusion.layerwise_blocks.*.attn': S,
        'text_fusion.refiner_blocks.*.attn': S,
        'transformer_blocks.*.attn': S,
    },
    'LongCatAudioDiTTransformer': {'blocks.*.self_attn': S, 'blocks.*.cross_attn': X},
    'LongCatImageTransformer2DModel': {'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'LTX2VideoTransformer3DModel': {
        'transformer_blocks.*.attn1': S,
        'transformer_blocks.*.audio_attn1': S,
        'transformer_blocks.*.attn2': X,
        'transformer_blocks.*.audio_attn2': X,
        'transformer_blocks.*.audio_to_video_attn': X,
        'transformer_blocks.*.video_to_audio_attn': X,
    },
    'MiniMaxH3Transformer3DModel': {'token_refiner.refiner_blocks.*.attn': S, 'transformer_blocks.*.attn': S},
    'MiniMaxMusic3Transformer1DModel': {'transformer_blocks.*.attn': S},
    'MotifVideoTransformer3DModel': {'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'NucleusMoEImageTransformer2DModel': {'transformer_blocks.*.attn': J},
    'OvisImageTransformer2DModel': {'transformer_blocks.*.attn': J, 'single_transformer_blocks.*.attn': J},
    'PRXTransformer2DModel': {'blocks.*.attention': S},
    'QwenImage21Transformer2DModel': {'transformer_blocks.*.attn': J},
    'RFD4ProteinaTransformer': {'transformer_layers.*.mhba.mha': S},
    'SanaWMTransformer3DModel': {'blocks.*.cross_attn': X, 'blocks.*.attn.attn': S, 'blocks.*.attn.cam_attn': S},
    'SanaWMLTX2RefinerTransformer3DModel': {
        'transformer_blocks.*.attn1': S,
        'transformer_blocks.*.audio_attn1': S,
        'transformer_blocks.*.attn2': X,
        'transformer_blocks.*.audio_attn2': X,
        'transformer_blocks.*.audio_to_video_attn': X,
        'transformer_blocks.*.video_to_audio_attn': X,
    },
    'StableAudio3DiTModel': {'transformer_blocks.*.self_attn': S, 'transformer_blocks.*.cross_attn': X},
    'TransformerTemporalModel': {'transformer_blocks.*.attn1': S, 'transformer_blocks.*.attn2': S},
    'WanAnimateTransformer3DModel': {'blocks.*.attn1': S, 'blocks.*.attn2': X, 'face_adapter.*': X},
    'WanAnimate2Transformer3DModel': {'blocks.*.self_attn': S, 'blocks.*.cross_attn': X},
    'ZImageTransformer2DModel': {
        'noise_refiner.*.attention': S,
        'context_refiner.*.attention': S,
        'layers.*.attention': J,
    },
})


@pytest.mark.parametrize("name", sorted(n for n in set(CLASSES) - set(NOT_BUILT)
                                        if any(k == OUT for k in EXPECTED.get(n, {}).values())))
def test_out_of_reach_layers_warn_once_naming_the_layer_and_the_fix(name):
    model = _build(CLASSES[name])
    reach = [i for i in litepatch.inspect(model) if i.out_of_reach]
    assert reach and all("set_processor" in i.out_of_reach or "fused_attn" in i.out_of_reach for i in reach)


@pytest.mark.parametrize("name", ["SanaTransformer2DModel", "SanaVideoTransformer3DModel"])
def test_linear_attention_is_not_applicable_and_apply_says_so(name):
    model = _build(CLASSES[name])
    infos = litepatch.inspect(model)
    linear = [i for i in infos if i.kind == NA]
    assert linear and all("linear attention" in i.reason and not i.sparse for i in linear)
    with pytest.raises(ValueError, match="not applicable: .*Attention"):
        litepatch.apply(model)
