"""DESIGN §1 additions and §2's backend registry on the CPU reference: non-finite scores never vote,
key-padding masks, read-only calls, and what dispatch says when a backend cannot serve."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from litepatch.kernels import BackendUnavailable, SkipState, lite_attention, registry
from test_reference import local_qkv


def run(q, k, v, state, steps, **kw):
    for _ in range(steps):
        out = lite_attention(q, k, v, state, **kw)
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["q", "k"])
def test_one_non_finite_activation_does_not_shrink_later_lists(bad, where):
    q, k, v = local_qkv(seq=512, heads=2, sharpness=0.0)  # flat scores: a clean call at -10 skips nothing
    clean = SkipState()
    run(q, k, v, clean, 3, threshold=-10.0)
    assert clean.read_list().all()
    state = SkipState()
    lite_attention(q, k, v, state, threshold=-10.0)
    poisoned = {"q": q.clone(), "k": k.clone()}
    poisoned[where][0, 37, 1, 5] = bad
    lite_attention(poisoned["q"] if where == "q" else q, poisoned["k"] if where == "k" else k, v, state,
                   threshold=-10.0)
    run(q, k, v, state, 2, threshold=-10.0)
    assert torch.equal(state.read_list(), clean.read_list()), "one bad activation dropped tiles for later calls"


def _masked_sdpa(q, k, v, key_valid):
    mask = key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def test_key_padding_mask_equals_masked_sdpa_and_skips_fully_masked_tiles():
    q, k, v = local_qkv(batch=2, seq=400, heads=2)
    lengths = torch.tensor([400, 150])  # row 1: key tiles 3..6 (128x64 tiles) hold no valid key
    key_valid = torch.arange(400)[None, :] < lengths[:, None]
    state = SkipState()
    out = lite_attention(q, k, v, state, threshold=-math.inf, key_mask=key_valid)
    torch.testing.assert_close(out, _masked_sdpa(q, k, v, key_valid), atol=2e-5, rtol=2e-5)
    q_tiles, k_tiles = state.q_tiles, state.k_tiles
    computed = 2 * q_tiles * k_tiles + 2 * q_tiles * math.ceil(150 / 64)
    assert int(state.kept) == computed
    assert state.read_list().all(), "masked tiles stay in the stored list: the next call's mask may differ"
    # the same lengths as key_lengths, and a [B, 1, 1, S] mask, give the same call
    out_lengths = lite_attention(q, k, v, SkipState(), threshold=-math.inf, key_lengths=lengths)
    out_4d = lite_attention(q, k, v, SkipState(), threshold=-math.inf, key_mask=key_valid[:, None, None, :])
    assert torch.equal(out, out_lengths) and torch.equal(out, out_4d)


def test_masked_keys_do_not_vote_and_a_longer_mask_later_computes_them_again():
    q, k, v = local_qkv(batch=1, seq=512, heads=2, sharpness=4.0)
    short = torch.arange(512)[None, :] < 200
    state = SkipState()
    run(q, k, v, state, 3, threshold=-4.0, key_mask=short)
    stored = state.read_list()
    assert stored[..., 200 // 64 + 1 :].all(), "a masked tile was voted on"
    out = lite_attention(q, k, v, state, threshold=-math.inf)  # no mask: the masked tiles come back
    reference = lite_attention(q, k, v, _state_with(stored), threshold=-math.inf)
    assert torch.equal(out, reference)


def _state_with(read):
    state = SkipState()
    q, k, v = local_qkv(batch=1, seq=512, heads=2, sharpness=4.0)
    lite_attention(q, k, v, state, threshold=-math.inf)
    from litepatch.kernels import pack_bits

    state.keep.copy_(pack_bits(read))
    return state


def test_key_mask_that_is_not_per_key_is_refused():
    q, k, v = local_qkv(batch=2, seq=128, heads=2)
    with pytest.raises(ValueError, match="not a per-key mask"):
        lite_attention(q, k, v, key_mask=torch.ones(2, 2, 128, 128, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        lite_attention(q, k, v, key_mask=torch.zeros(2, 128))
    with pytest.raises(ValueError, match="not both"):
        lite_attention(q, k, v, key_mask=torch.ones(2, 128, dtype=torch.bool), key_lengths=[128, 128])


def test_read_only_call_keeps_the_lists():
    q, k, v = local_qkv(seq=512, heads=2, sharpness=4.0)
    state = SkipState()
    run(q, k, v, state, 2, threshold=-2.0)
    before = state.read_list().clone()
    assert not before.all()
    out = lite_attention(q, k, v, state, threshold=0.0, vote=False)
    assert torch.equal(state.read_list(), before)
    assert int(state.kept) == int(before.sum())
    assert torch.isfinite(out).all()


def test_auto_picks_the_reference_for_cpu_tensors_only():
    q = torch.randn(1, 256, 2, 96)
    assert registry.select(q, 256).name == "reference"
    assert registry.refusal(q, 256) is None
    meta = torch.empty(1, 256, 2, 64, device="meta")
    reason = registry.refusal(meta, 256)
    assert reason.startswith("no LiteAttention backend takes this call (")
    assert "reference" not in reason, "the CPU reference must never be chosen for non-CPU tensors"


def test_remembered_selections_follow_registrations():
    """select remembers its answers per kind of call; a backend registered or dropped later must still count."""
    from litepatch.kernels.reference import reference_forward
    from litepatch.kernels.registry import Backend, Constraints
    from litepatch.kernels.state import TileConfig

    q = torch.randn(1, 256, 2, 64)
    assert registry.select(q, 256).name == "reference"
    custom = Backend(name="test-remembered", forward=reference_forward, tiles=lambda head_dim: TileConfig(64, 32),
                     constraints=Constraints(device_types=("cpu",), dtypes=(torch.float32,)))
    registry.register_backend(custom)
    try:
        assert registry.select(q, 256) is custom  # a registered backend comes before the reference
        with pytest.raises(BackendUnavailable, match="dtype float16"):
            registry.select(q.half(), 256, backend="test-remembered")
        with pytest.raises(BackendUnavailable, match="dtype float16"):  # a remembered refusal raises again
            registry.select(q.half(), 256, backend="test-remembered")
    finally:
        registry._REGISTERED.pop("test-remembered")
    assert registry.select(q, 256).name == "reference"


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(BackendUnavailable, match="unknown backend 'trition'.*reference"):
        registry.get("trition")


def test_named_gpu_backend_loads_by_name_in_a_fresh_process():
    """``backend="triton"`` must not depend on an earlier ``auto`` call having imported the module."""
    code = (
        "import torch, litepatch.kernels.registry as r\n"
        "try:\n    b = r.get('triton'); print('loaded', b.name)\n"
        "except r.BackendUnavailable as e:\n    print('refused', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    try:
        import triton  # noqa: F401
    except ImportError:
        assert out.startswith("refused backend 'triton' cannot load: triton is not installed"), out
        assert 'pip install "litepatch[triton]"' in out
    else:
        assert out.startswith("loaded triton"), out


def test_constraints_name_what_they_refuse():
    from litepatch.kernels.registry import Constraints
    from litepatch.kernels.state import TileConfig

    c = Constraints(device_types=("cpu",), dtypes=(torch.bfloat16,), head_dims=(64, 128), max_k_tiles=2,
                    key_padding=False)
    tiles = TileConfig(128, 128)
    assert "dtype float32" in c.refusal(torch.randn(1, 8, 1, 64), 8, tiles, False)
    assert "head_dim 96" in c.refusal(torch.randn(1, 8, 1, 96, dtype=torch.bfloat16), 8, tiles, False)
    assert "3 key tiles" in c.refusal(torch.randn(1, 8, 1, 64, dtype=torch.bfloat16), 300, tiles, False)
    assert "key-padding" in c.refusal(torch.randn(1, 8, 1, 64, dtype=torch.bfloat16), 8, tiles, True)
    assert c.refusal(torch.randn(1, 8, 1, 64, dtype=torch.bfloat16), 8, tiles, False) is None
