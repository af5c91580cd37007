"""litepatch inside diffusers' own context parallelism (issue 8): a tiny random-weight WanTransformer3DModel with
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` and the native attention backend, on 2 gloo
ranks (CPU, reference kernel), against the single-process patched run of the same weights and inputs: outputs
within float tolerance and each rank's read lists equal to the single-process lists of its heads, over 3 calls that
skip. Ring context parallelism runs sparse: tests/unit/test_parallel_diffusers_ring.py."""

from __future__ import annotations

import contextlib
import functools
import math
from unittest import mock

import pytest
import torch
import tiny_models as tm
from test_parallel_gloo import one_thread

import litepatch
from litepatch.parallel import spawn_gloo

diffusers = pytest.importorskip("diffusers")

WORLD = 2
HEADS = 4
TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=32, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)
LATENT_SHAPE = (1, 4, 2, 32, 32)  # 2 x 16 x 16 = 512 video tokens: 4 query tiles x 8 key tiles per head
TIMESTEPS = (999.0, 900.0, 800.0)
THRESHOLD = -4.0
SHARPNESS = 4.0


def tiny_wan():
    """The model and inputs every process builds identically, with peaked self-attention so the threshold skips."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY_WAN).eval()
    tm.sharpen_wan_self_attention(model, SHARPNESS)
    latents = torch.randn(LATENT_SHAPE)
    text = torch.randn(1, 8, TINY_WAN["text_dim"])
    return model, latents, text


@torch.no_grad()
def forward(model, latents, text, t):
    return model(hidden_states=latents, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)[0]


def read_lists(handle) -> dict:
    """``{layer: {branch: bool[B, H, q_tiles, k_tiles]}}``, copied (the states change in place)."""
    return {
        name: {branch: state.read_list().clone() for branch, state in branches.items()}
        for name, branches in handle.skip_states().items()
    }


def patched_calls(model, latents, text) -> tuple[list, list, float]:
    handle = litepatch.apply(model, threshold=THRESHOLD, warmup_steps=0)
    outs, reads = [], []
    for t in TIMESTEPS:
        outs.append(forward(model, latents, text, t))
        reads.append(read_lists(handle))
    return outs, reads, handle


@contextlib.contextmanager
def cpu_accelerator():
    """diffusers' ``_resolve_parallel_config`` (modeling_utils.py) always computes
    ``torch.device(device_type, rank % torch.accelerator.device_count())``, which divides by zero without an
    accelerator, even when the config carries a prebuilt ``mesh``. On CPU the device it builds is only recorded
    (``ContextParallelConfig._device``), so counting the CPU as one device changes nothing else."""
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def enable_parallelism(model, **degrees):
    with cpu_accelerator():
        model.enable_parallelism(config=diffusers.ContextParallelConfig(**degrees))


def worker(rank, world):
    """Runs every scenario on one rank; returns what the main process compares."""
    res = {}
    # 1. enable_parallelism, then apply: 3 calls that skip, then remove()
    model, latents, text = tiny_wan()
    enable_parallelism(model, ulysses_degree=world)
    dense = forward(model, latents, text, TIMESTEPS[0])
    res["outs"], res["reads"], handle = patched_calls(model, latents, text)
    res["kept_fraction"] = handle.stats().kept_fraction()
    res["dense_records"] = [r for r in handle.stats().records if r["dense"]]
    res["steps"] = [(r["layer"], r["step"], r["branch"], r["generation"]) for r in handle.stats().records]
    res["fingerprint"] = litepatch.fingerprint(model)  # heads stay the model's (diffusers shards inside attention)
    handle.remove()
    res["removed_exactly"] = torch.equal(forward(model, latents, text, TIMESTEPS[0]), dense)
    res["instance_forwards"] = [n for n, m in model.named_modules() if "forward" in m.__dict__ and "attn" in n]

    # 2. apply, then enable_parallelism: the first call already runs sparse on local heads
    model, latents, text = tiny_wan()
    handle = litepatch.apply(model, threshold=THRESHOLD, warmup_steps=0)
    enable_parallelism(model, ulysses_degree=world)
    res["apply_first"] = forward(model, latents, text, TIMESTEPS[0]), read_lists(handle)

    # 3. joint text+video attention (Flux splits text and image tokens): each SDPA call sees the 2 rank shards end
    # to end, each with its own text tokens
    model, inputs = tm.flux()
    enable_parallelism(model, ulysses_degree=world)
    with torch.no_grad():
        # Flux's last op is diffusers' output all-gather, which returns an AsyncCollectiveTensor: clone() waits for
        # it (torch.save of the result would read the buffer before gloo has filled it)
        dense = model(**inputs)[0].clone()
        handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED, warmup_steps=0)
        res["flux_exact"] = model(**inputs)[0].clone(), dense
    res["flux_must_keys"] = {
        name: [state.must_compute_keys for state in branches.values()]
        for name, branches in handle.skip_states().items()
    }
    res["flux_dense_records"] = [r for r in handle.stats().records if r["dense"]]
    handle.remove()
    return res


@functools.lru_cache
@one_thread()
def single_process():
    """The target: the same model patched in one process (nothing parallel), and its dense outputs."""
    model, latents, text = tiny_wan()
    dense = [forward(model, latents, text, t) for t in TIMESTEPS]
    outs, reads, handle = patched_calls(model, latents, text)
    kept = handle.stats().kept_fraction()
    steps = [(r["layer"], r["step"], r["branch"], r["generation"]) for r in handle.stats().records]
    fingerprint = litepatch.fingerprint(model)
    handle.remove()
    return outs, reads, kept, dense, steps, fingerprint


@pytest.fixture(scope="module")
def ranks():
    return spawn_gloo(WORLD, worker, timeout_s=120)


def assert_heads_slice(got: dict, want: dict, rank: int) -> None:
    local = HEADS // WORLD
    assert got.keys() == want.keys() and got, "every patched layer must hold a state on every rank"
    for name, branches in want.items():
        assert got[name].keys() == branches.keys(), name
        for branch, read in branches.items():
            assert got[name][branch].shape[1] == local, (name, branch)
            assert torch.equal(got[name][branch], read[:, rank * local : (rank + 1) * local]), (name, branch, rank)


def test_ulysses_outputs_and_read_lists_equal_the_single_process_run(ranks):
    outs, reads, kept, dense, steps, fingerprint = single_process()
    assert kept < 1.0, "the case must skip tiles"
    # skipping moves the output by more than the tolerance: a rank that ran dense attention would fail here
    assert not torch.allclose(outs[-1], dense[-1], rtol=1e-4, atol=1e-5)
    for rank, r in enumerate(ranks):
        assert r["dense_records"] == [], "no layer may fall back to dense under Ulysses"
        assert r["kept_fraction"] < 1.0
        assert r["steps"] == steps and r["fingerprint"] == fingerprint
        for call in range(len(TIMESTEPS)):
            torch.testing.assert_close(r["outs"][call], outs[call], rtol=1e-4, atol=1e-5)
            assert_heads_slice(r["reads"][call], reads[call], rank)
    # the lists change across calls (the test compares evolving skip state, not the all-ones first list)
    assert any(not read.all() for branches in reads[-1].values() for read in branches.values())


def test_remove_after_enable_parallelism_restores_the_parallel_model(ranks):
    for r in ranks:
        assert r["removed_exactly"]
        assert r["instance_forwards"] == []


def test_apply_before_enable_parallelism_runs_sparse_on_local_heads(ranks):
    outs, reads, *_ = single_process()
    for rank, r in enumerate(ranks):
        out, got = r["apply_first"]
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)
        assert_heads_slice(got, reads[0], rank)


def test_joint_attention_protects_the_text_of_every_shard(ranks):
    # tiny Flux: 192 image and 12 text tokens -> per rank 96 + 6, text first; one SDPA call sees 2 x 102 tokens
    for r in ranks:
        assert r["flux_dense_records"] == []
        must = r["flux_must_keys"]
        assert must["transformer_blocks.0.attn"] == [((0, 6), (102, 108))]
        # single-stream blocks protect the text tokens the double-stream layers of the same call saw: 6 per shard
        assert must["single_transformer_blocks.0.attn"] == [((0, 6), (102, 108))]
        out, dense = r["flux_exact"]
        torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)


def test_dense_reason_names_a_backend_that_bypasses_sdpa():
    from litepatch.diffusers_cp import dense_reason, ulysses_degree

    model, _, _ = tiny_wan()
    assert dense_reason(model) is None and ulysses_degree(model.blocks[0].attn1) == 1
    cp = diffusers.ContextParallelConfig(ulysses_degree=2)
    with mock.patch.object(model, "_parallel_config", diffusers.ParallelConfig(context_parallel_config=cp)):
        assert dense_reason(model) is None
        for block in model.blocks:
            block.attn1.processor._attention_backend = "flash"
        assert "'flash' attention backend runs dense attention" in dense_reason(model)
