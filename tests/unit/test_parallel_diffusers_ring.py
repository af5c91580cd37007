"""litepatch inside diffusers' ring context parallelism (issue 15): tiny random-weight diffusers models with
``enable_parallelism(config=ContextParallelConfig(ring_degree=2))`` (and ``ulysses_degree=2, ring_degree=2`` on 4
ranks) and the native attention backend, on gloo ranks (CPU, reference kernel).

The equality target of a ring is the single-process *chunked* run (``litepatch.parallel`` module docstring): here
the same Wan model in one process whose self-attention calls ``chunked_lite_attention`` with two chunks and one
state per (query shard, K/V chunk). Each ring rank must hold exactly the states of its query shard, with the same
read lists per chunk over 3 calls that skip, and the model output within float tolerance. Dense calls (warm-up,
``threshold=-inf``) equal the single-process dense model; a joint model (Flux) keeps its text tiles in every
chunk; ``remove()`` gives back diffusers' own behaviour (its native backend cannot run the ring template)."""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from unittest import mock

import pytest
import torch
from test_parallel_diffusers import TIMESTEPS, enable_parallelism, forward, tiny_wan
from test_parallel_gloo import one_thread

import litepatch
from litepatch.parallel import ChunkedSkipState, ChunkKey, chunked_lite_attention, spawn_gloo

diffusers = pytest.importorskip("diffusers")

WORLD = 2
HEADS = 4
LAYERS = 2
THRESHOLD = -2.0  # every chunk restarts the running max (first visit never skippable): more aggressive than Ulysses
FLUX_THRESHOLD = -1.0
FLUX_TEXT, FLUX_GRID = 12, 32  # 12 text and 32 x 32 image tokens: per rank 6 + 512, text first
NATIVE_RING_ERROR = "return_lse"  # diffusers' native backend refuses the ring template's return_lse=True


def sharp_flux():
    """A tiny Flux whose attention is peaked (q and k tied and scaled, as tm.sharpen_wan_self_attention does)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    ).eval()
    with torch.no_grad():
        for block in (*model.transformer_blocks, *model.single_transformer_blocks):
            attn = block.attn
            pairs = [("to_q", "to_k", "norm_q", "norm_k")]
            if getattr(attn, "add_q_proj", None) is not None:
                pairs.append(("add_q_proj", "add_k_proj", "norm_added_q", "norm_added_k"))
            for q_proj, k_proj, q_norm, k_norm in pairs:
                getattr(attn, k_proj).load_state_dict(getattr(attn, q_proj).state_dict())
                getattr(attn, q_norm).weight.mul_(4.0)
                getattr(attn, k_norm).weight.copy_(getattr(attn, q_norm).weight)
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(FLUX_GRID)), torch.arange(float(FLUX_GRID)),
                                      indexing="ij"), -1).reshape(-1, 3)
    inputs = {
        "hidden_states": torch.randn(1, FLUX_GRID * FLUX_GRID, 4),
        "encoder_hidden_states": torch.randn(1, FLUX_TEXT, 16),
        "pooled_projections": torch.randn(1, 8),
        "img_ids": grid,
        "txt_ids": torch.zeros(FLUX_TEXT, 3),
        "return_dict": False,
    }
    return model, inputs


@torch.no_grad()
def flux_forward(model, inputs, t):
    # clone(): the output is diffusers' all-gather, an AsyncCollectiveTensor until an op waits for it
    return model(**inputs, timestep=torch.tensor([t]))[0].clone()


def chunk_reads(handle) -> dict:
    """``{layer: {ChunkKey: bool[B, H, q_tiles, k_tiles]}}``, copied."""
    return {
        name: {key: state.read_list().clone() for key, state in branches.items()}
        for name, branches in handle.skip_states().items()
    }


def processors(model) -> list:
    return [m.__dict__.get("processor") for m in model.modules() if "processor" in m.__dict__]


def native_ring_error(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def worker(rank, world):
    """Every ring-2 scenario on one rank; returns what the main process compares."""
    res = {}
    # 1. sparse: 3 calls that skip, per-chunk states and records; remove() gives diffusers' behaviour back
    model, latents, text = tiny_wan()
    enable_parallelism(model, ring_degree=world)
    before = processors(model)
    res["error_before"] = native_ring_error(lambda: forward(model, latents, text, TIMESTEPS[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = litepatch.apply(model, threshold=THRESHOLD, warmup_steps=0)
        res["outs"], res["reads"] = [], []
        for t in TIMESTEPS:
            res["outs"].append(forward(model, latents, text, t))
            res["reads"].append(chunk_reads(handle))
    res["warnings"] = [str(w.message) for w in caught if "litepatch" in str(w.message)]
    stats = handle.stats()
    res["kept_fraction"] = stats.kept_fraction()
    res["records"] = [(r["layer"], r["step"], r["branch"], r["dense"]) for r in stats.records]
    handle.remove()
    res["processors_restored"] = all(a is b for a, b in zip(processors(model), before, strict=True))
    res["error_after"] = native_ring_error(lambda: forward(model, latents, text, TIMESTEPS[0]))

    # 2. dense calls: one warm-up step, then threshold -inf: diffusers' ring template with an exact dense op
    handle = litepatch.apply(model, threshold=-math.inf, warmup_steps=1)
    res["dense_outs"] = [forward(model, latents, text, t) for t in TIMESTEPS[:2]]
    res["dense_records"] = [(r["layer"], r["step"], r["branch"], r["dense"], r["reason"])
                            for r in handle.stats().records]
    handle.remove()

    # 3. joint text+image attention (Flux): text tiles are must-compute in every (query shard, K/V chunk)
    model, inputs = sharp_flux()
    enable_parallelism(model, ring_degree=world)
    handle = litepatch.apply(model, threshold=FLUX_THRESHOLD, warmup_steps=0)
    flux_outs = [flux_forward(model, inputs, t) for t in (1.0, 0.9)]
    states = handle.skip_states()
    res["flux_must"] = {name: {key: (s.must_compute_queries, s.must_compute_keys) for key, s in branches.items()}
                        for name, branches in states.items()}
    res["flux_reads"] = chunk_reads(handle)
    res["flux_tiles"] = {s.tiles for branches in states.values() for s in branches.values()}
    res["flux_kept"] = handle.stats().kept_fraction()
    res["flux_dense_records"] = [r for r in handle.stats().records if r["dense"]]
    handle.remove()
    handle = litepatch.apply(model, threshold=-math.inf, warmup_steps=0)
    res["flux_exact"] = flux_forward(model, inputs, 1.0)
    res["flux_sparse"] = flux_outs[-1]
    handle.remove()
    return res


def mixed_worker(rank, world):
    """Ulysses x ring (2 x 2 on 4 ranks): diffusers' unified template around the same per-chunk op."""
    model, latents, text = tiny_wan()
    enable_parallelism(model, ulysses_degree=2, ring_degree=2)
    cp = model._parallel_config.context_parallel_config
    handle = litepatch.apply(model, threshold=THRESHOLD, warmup_steps=0)
    outs, reads = [], []
    for t in TIMESTEPS:
        outs.append(forward(model, latents, text, t))
        reads.append(chunk_reads(handle))
    res = {"ring_rank": cp._ring_local_rank, "ulysses_rank": cp._ulysses_local_rank, "outs": outs, "reads": reads,
           "dense": [r for r in handle.stats().records if r["dense"]]}
    handle.remove()
    return res


@functools.lru_cache
@one_thread()
def chunked_reference():
    """The single-process target: the same Wan, each self-attention call through ``chunked_lite_attention`` with
    ``n_chunks=2`` and one state per (layer, query shard, K/V chunk); plus the dense model's outputs."""
    from diffusers.models.transformers import transformer_wan

    model, latents, text = tiny_wan()
    dense = [forward(model, latents, text, t) for t in TIMESTEPS]
    states = [ChunkedSkipState() for _ in range(LAYERS)]
    self_calls = itertools.count()
    original = transformer_wan.dispatch_attention_fn

    def dispatch(query, key, value, *args, **kwargs):
        if query.shape[1] != key.shape[1]:  # cross-attention: text keys
            return original(query, key, value, *args, **kwargs)
        return chunked_lite_attention(query, key, value, states[next(self_calls) % LAYERS], n_chunks=WORLD,
                                      threshold=THRESHOLD)

    outs, reads = [], []
    with mock.patch.object(transformer_wan, "dispatch_attention_fn", dispatch):
        for t in TIMESTEPS:
            outs.append(forward(model, latents, text, t))
            reads.append([{key: s.read_list().clone() for key, s in layer.items()} for layer in states])
    return outs, reads, dense


@functools.lru_cache
@one_thread()
def flux_dense():
    model, inputs = sharp_flux()
    return flux_forward(model, inputs, 1.0)


@pytest.fixture(scope="module")
def ranks():
    return spawn_gloo(WORLD, worker, timeout_s=120)


def assert_chunk_lists(got: dict, want: list, shard: int, heads: slice = slice(None)) -> None:
    """``got`` (one rank's ``chunk_reads``) holds exactly the states of query shard ``shard``, equal to the chunked
    run's lists of that shard (and of the rank's heads)."""
    assert sorted(got) == [f"blocks.{layer}.attn1" for layer in range(LAYERS)]
    for layer, ref in enumerate(want):
        mine = got[f"blocks.{layer}.attn1"]
        assert sorted(mine) == [ChunkKey(0, shard, c) for c in range(WORLD)], sorted(mine)
        for (_, i, c), read in mine.items():
            assert torch.equal(read, ref[i, c][:, heads]), (layer, i, c)


def test_ring_outputs_and_chunk_lists_equal_the_single_process_chunked_run(ranks):
    outs, reads, dense = chunked_reference()
    # skipping moves the output by more than the tolerance: a rank that ran dense attention would fail here
    assert not torch.allclose(outs[-1], dense[-1], rtol=1e-4, atol=1e-5)
    assert any(not read.all() for layer in reads[-1] for read in layer.values()), "the lists must evolve"
    for rank, r in enumerate(ranks):
        for call in range(len(TIMESTEPS)):
            torch.testing.assert_close(r["outs"][call], outs[call], rtol=1e-4, atol=1e-5)
            assert_chunk_lists(r["reads"][call], reads[call], shard=rank)


def test_ring_skips_and_counts_every_chunk_call(ranks):
    for rank, r in enumerate(ranks):
        assert r["warnings"] == [], "ring context parallelism is supported: nothing to warn about"
        assert r["kept_fraction"] < 0.95, r["kept_fraction"]
        # one record per (layer, step, K/V chunk), none dense
        want = {(f"blocks.{layer}.attn1", step, ChunkKey(0, rank, c), False)
                for layer in range(LAYERS) for step in range(len(TIMESTEPS)) for c in range(WORLD)}
        assert len(r["records"]) == len(want) and set(r["records"]) == want


def test_dense_calls_run_diffusers_ring_template_exactly(ranks):
    _, _, dense = chunked_reference()
    for rank, r in enumerate(ranks):
        for call, out in enumerate(r["dense_outs"]):
            torch.testing.assert_close(out, dense[call], rtol=1e-4, atol=1e-5)
        reasons = {(step, reason) for _, step, _, is_dense, reason in r["dense_records"] if is_dense}
        assert reasons == {(0, "warm-up"), (1, "threshold -inf skips nothing")}
        assert len(r["dense_records"]) == 2 * LAYERS * WORLD
        assert all(is_dense and key.shard == rank for _, _, key, is_dense, _ in r["dense_records"])


def test_remove_gives_back_diffusers_own_ring_behaviour(ranks):
    for r in ranks:
        assert r["processors_restored"]
        # diffusers' native backend cannot run its ring template, with or without litepatch: the same error after
        assert r["error_before"] is not None and NATIVE_RING_ERROR in r["error_before"]
        assert r["error_after"] == r["error_before"]


def test_joint_ring_protects_the_text_tiles_of_every_chunk(ranks):
    exact = flux_dense()
    for rank, r in enumerate(ranks):
        assert r["flux_dense_records"] == []
        assert r["flux_kept"] < 1.0, "the case must skip tiles"
        for name in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"):
            chunks = r["flux_must"][name]
            assert sorted(chunks) == [ChunkKey(0, rank, c) for c in range(WORLD)]
            # 6 text tokens first in every rank's shard: (0, 6) in the local coordinates of each chunk
            assert all(must == (((0, 6),), ((0, 6),)) for must in chunks.values()), chunks
        (tiles,) = r["flux_tiles"]
        for name, chunks in r["flux_reads"].items():
            for key, read in chunks.items():
                assert read[..., 0].all(), f"{name} {key}: a key tile holding text was skipped"
                assert read[:, :, 0].all(), f"{name} {key}: a query tile holding text skipped a key tile"
        assert any(not read.all() for chunks in r["flux_reads"].values() for read in chunks.values())
        torch.testing.assert_close(r["flux_exact"], exact, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(r["flux_sparse"], exact, rtol=1e-4, atol=1e-5)
        assert tiles.block_m >= 6 and tiles.block_n >= 6  # the text sits in tile 0 of both axes


def test_ulysses_times_ring_equals_the_chunked_run_for_each_ranks_heads():
    """2 x 2 on 4 ranks: ring rank r holds query shard r (the Ulysses group's two shards end to end) for the
    Ulysses rank's 2 of 4 heads; its chunk lists equal the chunked run's heads slice."""
    outs, reads, _ = chunked_reference()
    results = spawn_gloo(4, mixed_worker, timeout_s=120)
    local = HEADS // 2
    seen = set()
    for r in results:
        ring_rank, u = r["ring_rank"], r["ulysses_rank"]
        seen.add((ring_rank, u))
        assert r["dense"] == []
        for call in range(len(TIMESTEPS)):
            torch.testing.assert_close(r["outs"][call], outs[call], rtol=1e-4, atol=1e-5)
            assert_chunk_lists(r["reads"][call], reads[call], shard=ring_rank, heads=slice(u * local, (u + 1) * local))
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def fake_ring_config(**overrides):
    from types import SimpleNamespace

    fields = dict(ring_degree=2, ulysses_degree=1, _ring_local_rank=1, _ulysses_local_rank=0, ring_anything=False)
    fields.update(overrides)
    return SimpleNamespace(context_parallel_config=SimpleNamespace(**fields))


def test_missing_private_names_give_an_error_naming_the_diffusers_version():
    from diffusers.models import attention_dispatch

    from litepatch.diffusers_cp import RingLayout, ring_support_problem

    config = fake_ring_config()
    assert ring_support_problem(config) is None
    assert RingLayout.of(config).chunk_of(1) == 0  # ring rank 1: its own chunk, then ring rank 2 mod 2
    with mock.patch.object(attention_dispatch, "_templated_context_parallel_attention", None):
        problem = ring_support_problem(config)
        assert f"diffusers {diffusers.__version__} does not have" in problem
        assert "_templated_context_parallel_attention" in problem and "0.42.1" in problem
        with pytest.raises(RuntimeError, match="_templated_context_parallel_attention"):
            RingLayout.of(config)
    del config.context_parallel_config._ring_local_rank
    with pytest.raises(RuntimeError, match="ContextParallelConfig._ring_local_rank"):
        RingLayout.of(config)


def test_a_template_that_skips_a_chunk_is_an_error():
    from diffusers.models import attention_dispatch

    from litepatch.diffusers_cp import run_ring_template
    from litepatch.parallel import sdpa_with_lse

    def one_chunk_template(q, k, v, *args, forward_op, backward_op, _parallel_config):
        return forward_op(None, q, k, v, None, 0.0, False, None, False, True)[0]

    q = torch.randn(1, 64, 2, 16)
    with mock.patch.object(attention_dispatch, "_templated_context_parallel_attention", one_chunk_template):
        with pytest.raises(RuntimeError, match=r"for K/V chunks \[1\] with ring_degree=2"):
            run_ring_template(q, q, q, lambda c, q, k, v: sdpa_with_lse(q, k, v), scale=None,
                              parallel_config=fake_ring_config())


def test_dense_reason_under_ring():
    from litepatch.diffusers_cp import dense_reason

    model, _, _ = tiny_wan()
    for ring_anything, ulysses in ((False, 1), (False, 2), (True, 1)):
        cp = diffusers.ContextParallelConfig(ring_degree=2, ulysses_degree=ulysses)
        cp.ring_anything = ring_anything  # diffusers refuses ring_anything with Ulysses at construction only
        with mock.patch.object(model, "_parallel_config", diffusers.ParallelConfig(context_parallel_config=cp)):
            for block in model.blocks:  # any backend: sparse calls bypass it, dense calls use its ring path
                block.attn1.processor._attention_backend = "flash"
            reason = dense_reason(model)
            if ring_anything:
                assert "ring_anything=True" in reason and "runs dense" in reason
            else:
                assert reason is None
