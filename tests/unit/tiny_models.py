"""Tiny random-weight models for the patcher tests: real diffusers classes with small configs and
hand-written Wan/timm-style modules that call SDPA themselves. Every factory returns
``(model, inputs)`` where ``model(**inputs)`` runs one denoising call on CPU in fp32.

Sequences are a few hundred tokens (several 128x64 tiles) with 1-2 blocks, so a test stays fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# A finite threshold no gap between finite scores reaches: the kernel path with every tile kept. (Threshold -inf
# itself runs the model's own attention or flash-attn-4's dense one, DESIGN §2: nothing to skip, nothing to list.)
NOTHING_DROPPED = -1e30


# ------------------------------------------------------------------------------ hand-written models
class WanSelfAttention(nn.Module):
    """Like the original Wan repository's ``WanSelfAttention``: calls SDPA itself."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, s, self.dim))


class WanCrossAttention(WanSelfAttention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(context).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(context).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, s, self.dim))


class WanStyleBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = WanSelfAttention(dim, num_heads)
        self.cross_attn = WanCrossAttention(dim, num_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 2 * dim)

    def forward(self, x, t_emb, context):
        shift, scale = self.modulation(t_emb).unsqueeze(1).chunk(2, dim=-1)
        x = x + self.self_attn(self.norm1(x) * (1 + scale) + shift)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ffn(self.norm3(x))


class WanStyleDiT(nn.Module):
    """A hand-written Wan-style DiT: ``forward(x, t, context)`` with a smooth token layout."""

    def __init__(self, dim: int = 64, num_heads: int = 2, depth: int = 2, in_dim: int = 8):
        super().__init__()
        self.dim = dim
        self.patch_embedding = nn.Linear(in_dim, dim)
        self.text_embedding = nn.Linear(16, dim)
        self.time_embedding = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(WanStyleBlock(dim, num_heads) for _ in range(depth))
        self.head = nn.Linear(dim, in_dim)

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float().reshape(-1, 1) * freqs
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.patch_embedding(x)
        t_emb = self.time_embedding(self.sinusoidal(t).expand(x.shape[0], -1))
        ctx = self.text_embedding(context)
        for block in self.blocks:
            h = block(h, t_emb, ctx)
        return self.head(h)


def wan_style(seq: int = 300, batch: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model = WanStyleDiT().eval()
    # Smooth latents along the sequence (like video): neighbouring tokens are similar.
    base = torch.randn(batch, seq // 20 + 2, 8)
    x = F.interpolate(base.transpose(1, 2), size=seq, mode="linear", align_corners=True).transpose(1, 2)
    return model, {"x": x.contiguous(), "t": torch.tensor([999.0]), "context": torch.randn(batch, 12, 16)}


class Attention(nn.Module):
    """timm's ``Attention`` block (``qkv``, ``num_heads``, ``fused_attn``)."""

    def __init__(self, dim: int, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, dim // num_heads, (dim // num_heads) ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TimmStyleViT(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(dim), "attn": Attention(dim)})
                                    for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block["attn"](block["norm"](x))
        return x


# ------------------------------------------------------------------------------------ diffusers
def sharpen_wan_self_attention(model, sharpness: float) -> None:
    """Makes a random-weight diffusers Wan's self-attention peaked, as in trained video models.

    Random q/k projections give flat attention in which no tile is negligible, so no threshold skips
    anything. Tying ``to_k`` to ``to_q`` and scaling the q/k norms by ``sharpness`` makes each token
    attend mostly to tokens like itself.
    """
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn1
            attn.to_k.load_state_dict(attn.to_q.state_dict())
            attn.norm_q.weight.mul_(sharpness)
            attn.norm_k.weight.copy_(attn.norm_q.weight)


def wan_diffusers(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    # 5 frames x 8 x 16 latent, patch (1, 2, 2) -> 5 x 4 x 8 = 160 tokens
    inputs = {
        "hidden_states": torch.randn(1, 4, 5, 8, 16),
        "timestep": torch.tensor([999]),
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "return_dict": False,
    }
    return model, inputs


def cogvideox(seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=12,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 3, 4, 16, 16),  # 3 frames x 8 x 8 = 192 tokens
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "timestep": torch.tensor([999]),
        "return_dict": False,
    }
    return model, inputs


def hunyuan_video(seed: int = 0, masked: bool = True):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    ).eval()
    mask = torch.ones(1, 10, dtype=torch.bool)
    if masked:
        mask[:, 7:] = False
    inputs = {
        "hidden_states": torch.randn(1, 4, 6, 16, 16),  # 6 x 8 x 8 = 384 tokens
        "timestep": torch.tensor([999]),
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, 8),
        "guidance": torch.tensor([3500.0]),
        "return_dict": False,
    }
    return model, inputs


def ltx_video(seed: int = 0):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=1, caption_channels=16, qk_norm="rms_norm_across_heads",
    ).eval()
    frames, height, width = 3, 8, 10  # 240 tokens
    inputs = {
        "hidden_states": torch.randn(1, frames * height * width, 8),
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "timestep": torch.tensor([999]),
        "encoder_attention_mask": torch.ones(1, 10),
        "num_frames": frames,
        "height": height,
        "width": width,
        "return_dict": False,
    }
    return model, inputs


def flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    ).eval()
    image_tokens, text_tokens = 192, 12
    inputs = {
        "hidden_states": torch.randn(1, image_tokens, 4),
        "encoder_hidden_states": torch.randn(1, text_tokens, 16),
        "pooled_projections": torch.randn(1, 8),
        "timestep": torch.tensor([1.0]),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(12.0), torch.arange(16.0),
                                              indexing="ij"), -1).reshape(-1, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
        "return_dict": False,
    }
    return model, inputs


def sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=32,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 32, 32),  # 16 x 16 = 256 tokens
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "pooled_projections": torch.randn(1, 8),
        "timestep": torch.tensor([999]),
        "return_dict": False,
    }
    return model, inputs


DIFFUSERS_FACTORIES = {
    "wan": wan_diffusers,
    "cogvideox": cogvideox,
    "hunyuan_video": hunyuan_video,
    "ltx_video": ltx_video,
    "flux": flux,
    "sd3": sd3,
}


def mochi(seed: int = 0):
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=12,
    ).eval()
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 9:] = False  # 9 valid text tokens: the processor drops the 3 padded ones
    inputs = {
        "hidden_states": torch.randn(1, 4, 6, 16, 16),  # 6 x 8 x 8 = 384 tokens
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "timestep": torch.tensor([999]),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }
    return model, inputs


def qwen_image(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[:, 8:] = False
    inputs = {
        "hidden_states": torch.randn(1, 384, 16),  # 384 packed image tokens (frame 1, 16 x 24)
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([1.0]),
        "img_shapes": [(1, 16, 24)],
        "return_dict": False,
    }
    return model, inputs


def lumina2(seed: int = 0):
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    model = Lumina2Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, cap_feat_dim=16, axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 64, 64),
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 32, 40),  # 16 x 20 = 320 image tokens
        "timestep": torch.tensor([1.0]),
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "encoder_attention_mask": torch.ones(1, 10, dtype=torch.bool),
        "return_dict": False,
    }
    return model, inputs


DIFFUSERS_FACTORIES.update({"mochi": mochi, "qwen_image": qwen_image, "lumina2": lumina2})


# ------------------------------------------------------------------- nn.MultiheadAttention models
class MHABlock(nn.Module):
    """A DiT block on ``nn.MultiheadAttention``: self-attention, then cross-attention to the text."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x, context, key_padding_mask=None):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False, key_padding_mask=key_padding_mask)[0]
        return x + self.cross_attn(self.norm2(x), context, context, need_weights=False)[0]


class MHADiT(nn.Module):
    def __init__(self, dim: int = 64, num_heads: int = 2, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(MHABlock(dim, num_heads) for _ in range(depth))

    def forward(self, x, t, context, key_padding_mask=None):
        for block in self.blocks:
            x = block(x, context, key_padding_mask)
        return x


def mha_dit(seq: int = 320, seed: int = 0):
    torch.manual_seed(seed)
    model = MHADiT().eval()
    base = torch.randn(1, seq // 20 + 2, 64)
    x = 3 * F.interpolate(base.transpose(1, 2), size=seq, mode="linear", align_corners=True).transpose(1, 2)
    return model, {"x": x.contiguous(), "t": torch.tensor([999.0]), "context": torch.randn(1, 12, 64)}


class HandWrittenJointAttention(nn.Module):
    """Joint text+video attention written by hand: ``cat([context, x])`` then one SDPA call."""

    def __init__(self, dim: int = 64, num_heads: int = 2, text_layout: str | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        if text_layout is not None:
            self.text_layout = text_layout

    def forward(self, x, context):
        b, s, d = x.shape
        tokens = torch.cat([context, x], dim=1)
        qkv = self.qkv(tokens).view(b, tokens.shape[1], 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, tokens.shape[1], d)
        return self.o(out[:, context.shape[1]:])


def _grid_ids(height: int, width: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(height)), torch.arange(float(width)),
                                      indexing="ij"), -1).reshape(-1, 3)


def pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=32, sample_size=32, patch_size=2, caption_channels=16, norm_num_groups=4,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 32, 40),  # 16 x 20 = 320 tokens
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "timestep": torch.tensor([999]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }
    return model, inputs


def chroma(seed: int = 0):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 320, 4),
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "timestep": torch.tensor([1.0]),
        "img_ids": _grid_ids(16, 20),
        "txt_ids": torch.zeros(12, 3),
        "return_dict": False,
    }
    return model, inputs


def flux2(seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(20.0), torch.zeros(1),
                                      indexing="ij"), -1).reshape(1, -1, 4)
    inputs = {
        "hidden_states": torch.randn(1, 320, 4),
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "timestep": torch.tensor([1.0]),
        "img_ids": grid,
        "txt_ids": torch.zeros(1, 12, 4),
        "return_dict": False,
    }
    return model, inputs


def skyreels_v2(seed: int = 0):
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 5, 8, 16),  # 160 tokens
        "timestep": torch.tensor([999]),
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "return_dict": False,
    }
    return model, inputs


def auraflow(seed: int = 0):
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    model = AuraFlowTransformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
        out_channels=4, pos_embed_max_size=400,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 32, 40),  # 320 tokens
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "timestep": torch.tensor([999]),
        "return_dict": False,
    }
    return model, inputs


def cogview4(seed: int = 0):
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(seed)
    model = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=32,
        rope_axes_dim=(16, 16),
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 32, 40),  # 320 tokens
        "encoder_hidden_states": torch.randn(1, 12, 16),
        "timestep": torch.tensor([999]),
        "original_size": torch.tensor([[32.0, 40.0]]),
        "target_size": torch.tensor([[32.0, 40.0]]),
        "crop_coords": torch.tensor([[0.0, 0.0]]),
        "return_dict": False,
    }
    return model, inputs


def allegro(seed: int = 0):
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(seed)
    model = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=1, cross_attention_dim=32, sample_height=16, sample_width=16, sample_frames=5, caption_channels=16,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 5, 16, 16),  # 5 x 8 x 8 = 320 tokens
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "timestep": torch.tensor([999]),
        "return_dict": False,
    }
    return model, inputs


DIFFUSERS_FACTORIES.update({"pixart": pixart, "chroma": chroma, "flux2": flux2, "skyreels_v2": skyreels_v2,
                            "auraflow": auraflow, "cogview4": cogview4, "allegro": allegro})


def wan_vace(seed: int = 0):
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0],
        vace_in_channels=8,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 5, 8, 16),  # 160 tokens
        "timestep": torch.tensor([999]),
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "control_hidden_states": torch.randn(1, 8, 5, 8, 16),
        "return_dict": False,
    }
    return model, inputs


def latte(seed: int = 0):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(seed)
    model = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1, sample_size=16,
        patch_size=2, video_length=4, caption_channels=16, cross_attention_dim=32, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 4, 32, 32),  # 4 frames of 16 x 16 = 256 spatial tokens each
        "timestep": torch.tensor([999]),
        "encoder_hidden_states": torch.randn(1, 10, 16),
        "return_dict": False,
    }
    return model, inputs


DIFFUSERS_FACTORIES.update({"wan_vace": wan_vace, "latte": latte})


def hidream(seed: int = 0):
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 6, 6), max_resolution=(64, 64), llama_layers=[0, 1],
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 32, 40),  # 16 x 20 = 320 image tokens
        "timesteps": torch.tensor([999]),
        "encoder_hidden_states_t5": torch.randn(1, 8, 16),
        "encoder_hidden_states_llama3": torch.randn(2, 1, 6, 16),
        "pooled_embeds": torch.randn(1, 16),
        "return_dict": False,
    }
    return model, inputs


DIFFUSERS_FACTORIES["hidream"] = hidream


def timm_unfused():
    """A timm-style ViT whose second block computes its softmax by hand (``fused_attn=False``)."""
    model = TimmStyleViT()
    model.blocks[1]["attn"].fused_attn = False
    return model


def run_at(model, inputs: dict, t=None):
    """``model(**inputs)`` without grad; ``t`` (a timestep) replaces the hand-written models' ``t`` input."""
    inputs = dict(inputs)
    if t is not None:
        inputs["t"] = torch.tensor([float(t)])
    with torch.no_grad():
        return model(**inputs)


def assert_compiles_like_eager(model, handle, inputs: dict, run, timesteps, reason_chars: int = 300) -> None:
    """The patched ``model`` has no graph break under ``torch._dynamo.explain``, and ``torch.compile(fullgraph=True)``
    gives the eager outputs and kept tiles over ``run(model, inputs, t)`` for each timestep (the eager run first)."""
    eager = [run(model, inputs, t) for t in timesteps]
    eager_kept = [r["kept_tiles"] for r in handle.stats().records]
    handle.reset()
    handle.clear_stats()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, [str(b.reason)[:reason_chars] for b in explanation.break_reasons]
    handle.reset()
    handle.clear_stats()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs = [run(compiled, inputs, t) for t in timesteps]
    for out, ref in zip(outs, eager):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [r["kept_tiles"] for r in handle.stats().records] == eager_kept
    assert min(eager_kept) < max(eager_kept)  # the compiled model skips what the eager one skipped
