"""Ulysses and ring LiteAttention on 2 and 4 emulated ranks (torch.distributed gloo on CPU, reference kernel)
against the single-process runs they must equal: same read lists per head / per (query shard, K/V chunk),
outputs within float tolerance, over consecutive calls that skip."""

import contextlib
import copy
import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from litepatch.kernels import SkipState, lite_attention
from litepatch.parallel import (
    ChunkedSkipState,
    chunked_lite_attention,
    gather_head_work,
    head_work,
    load_report,
    place_heads,
    reshard_ulysses_state,
    ring_lite_attention,
    spawn_gloo,
    ulysses_lite_attention,
)

SEQ, HEADS, DIM, CALLS = 512, 4, 64, 3
# 4 ranks: 128-token chunks hold 2 key tiles, one of them the protected first visit; only an aggressive threshold
# skips there (the chunked-vs-unchunked difference of the module docstring)
THRESHOLDS = {2: -3.0, 4: 0.0}
MUST_Q, MUST_K = [(130, 140)], [(300, 330)]
PLACED = [3, 0, 2, 1]


def qkv(seq=SEQ, heads=HEADS, batch=2):
    """Video-like q/k (scores peak where positions are close), a different sharpness per head; every rank
    builds the same tensors and takes its shard."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(seq, dtype=torch.float32)[:, None]
    freqs = torch.logspace(-2.2, -0.5, DIM // 2)[None, :]
    feats = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=-1)
    sharp = torch.tensor([0.3 + 2.0 * h for h in range(heads)])[None, :, None, None]
    q = feats * sharp + 0.3 * torch.randn(batch, heads, seq, DIM, generator=gen)
    k = feats * sharp + 0.3 * torch.randn(batch, heads, seq, DIM, generator=gen)
    v = torch.randn(batch, heads, seq, DIM, generator=gen)
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


@contextlib.contextmanager
def one_thread():
    """The references are many small calls: intra-op threads only add overhead (and stall on a loaded CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shard(t, rank, world):
    n = t.shape[1] // world
    return t[:, rank * n : (rank + 1) * n]


def worker(rank, world):
    """Runs every parallel scenario on this rank and returns what the main process compares."""
    q, k, v = (shard(t, rank, world) for t in qkv())
    res = {"ulysses": [], "placed": [], "ring": [], "ring_dense": None}
    kwargs = dict(threshold=THRESHOLDS[world], must_compute_queries=MUST_Q, must_compute_keys=MUST_K)

    state, placed_state, ring_states = SkipState(), SkipState(), ChunkedSkipState()
    for _ in range(CALLS):
        out, lse = ulysses_lite_attention(q, k, v, state, return_lse=True, **kwargs)
        res["ulysses"].append((out, lse, state.read_list(), int(state.kept)))
        out = ulysses_lite_attention(q, k, v, placed_state, head_order=PLACED, **kwargs)
        res["placed"].append((out, placed_state.read_list()))
        out, lse = ring_lite_attention(q, k, v, ring_states, return_lse=True, **kwargs)
        res["ring"].append((out, lse, {key: s.read_list() for key, s in ring_states.items()}))
    res["ring_keys"] = ring_states.keys()
    res["ring_must"] = {key: (s.must_compute_queries, s.must_compute_keys) for key, s in ring_states.items()}
    res["ring_dense"] = ring_lite_attention(q, k, v, ChunkedSkipState(), threshold=-math.inf)

    # load balance: reports agree on every rank; placement from the gathered per-head work
    res["ulysses_report"] = load_report(state, group=None)
    res["ring_report"] = load_report(ring_states)
    work = gather_head_work(state)
    res["head_work"] = work
    order = place_heads(work, world)
    res["order"] = order
    moved = reshard_ulysses_state(state, None, order)
    res["moved_read"] = moved.read_list()
    # skipping continues from the moved lists: one more call under the new placement
    out = ulysses_lite_attention(q, k, v, moved, head_order=order, **kwargs)
    res["after_move"] = (out, moved.read_list())
    res["placed_work"] = gather_head_work(placed_state, head_order=PLACED)

    try:
        ulysses_lite_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], SkipState())
    except ValueError as err:
        res["odd_heads_error"] = str(err)
    dist.barrier()
    return res


@functools.lru_cache
@one_thread()
def single_process(world):
    """The Ulysses target: lite_attention on the whole tensors over the same calls (do not mutate the state)."""
    q, k, v = qkv()
    kwargs = dict(threshold=THRESHOLDS[world], must_compute_queries=MUST_Q, must_compute_keys=MUST_K)
    whole, outs = SkipState(), []
    for _ in range(CALLS):
        out, lse = lite_attention(q, k, v, whole, return_lse=True, **kwargs)
        outs.append((out, lse, whole.read_list(), int(whole.kept)))
    return outs, whole


@functools.lru_cache
@one_thread()
def chunked(world):
    """The ring target: the single-process chunked run over the same calls."""
    q, k, v = qkv()
    states, outs = ChunkedSkipState(), []
    for _ in range(CALLS):
        out, lse = chunked_lite_attention(
            q, k, v, states, n_chunks=world, threshold=THRESHOLDS[world], return_lse=True,
            must_compute_queries=MUST_Q, must_compute_keys=MUST_K,
        )
        outs.append((out, lse, {key: s.read_list() for key, s in states.items()}))
    return outs, states


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request):
    world = request.param
    return world, spawn_gloo(world, worker, timeout_s=240)


def test_ulysses_equals_single_process_lists_and_outputs(ranks):
    world, results = ranks
    reference, _ = single_process(world)
    local = HEADS // world
    for call, (out, lse, read, kept) in enumerate(reference):
        got_out = torch.cat([r["ulysses"][call][0] for r in results], dim=1)
        got_lse = torch.cat([r["ulysses"][call][1] for r in results], dim=2)
        torch.testing.assert_close(got_out, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_lse, lse, atol=1e-5, rtol=1e-5)
        for rank, r in enumerate(results):
            assert torch.equal(r["ulysses"][call][2], read[:, rank * local : (rank + 1) * local]), (call, rank)
        assert sum(r["ulysses"][call][3] for r in results) == kept
    assert not reference[-1][2].all(), "the case must skip tiles"
    assert not torch.equal(reference[1][2], reference[-1][2]) or reference[1][2].sum() < reference[0][2].sum()


def test_ulysses_with_head_placement_holds_the_placed_heads(ranks):
    world, results = ranks
    reference, _ = single_process(world)
    local = HEADS // world
    for call, (out, _, read, _) in enumerate(reference):
        torch.testing.assert_close(torch.cat([r["placed"][call][0] for r in results], 1), out, atol=1e-5, rtol=1e-5)
        for rank, r in enumerate(results):
            heads = PLACED[rank * local : (rank + 1) * local]
            assert torch.equal(r["placed"][call][1], read[:, heads]), (call, rank)


def test_ring_equals_the_chunked_single_process_run(ranks):
    world, results = ranks
    reference, states = chunked(world)
    for call, (out, lse, reads) in enumerate(reference):
        torch.testing.assert_close(torch.cat([r["ring"][call][0] for r in results], 1), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([r["ring"][call][1] for r in results], 2), lse, atol=1e-5, rtol=1e-5)
        for rank, r in enumerate(results):
            assert sorted(r["ring"][call][2]) == [(rank, c) for c in range(world)]
            for key, read in r["ring"][call][2].items():
                assert torch.equal(read, reads[key]), (call, key)
    assert not all(read.all() for read in reference[-1][2].values()), "the case must skip tiles"


def test_ring_shifts_must_compute_ranges_into_chunk_coordinates(ranks):
    world, results = ranks
    n = SEQ // world
    for rank, r in enumerate(results):
        for (i, c), (must_q, must_k) in r["ring_must"].items():
            assert i == rank
            q_lo, q_hi = max(130, i * n), min(140, (i + 1) * n)
            assert must_q == (((q_lo - i * n, q_hi - i * n),) if q_lo < q_hi else ())
            k_lo, k_hi = max(300, c * n), min(330, (c + 1) * n)
            assert must_k == (((k_lo - c * n, k_hi - c * n),) if k_lo < k_hi else ())
    assert any(must_k for r in results for _, must_k in r["ring_must"].values())


def test_ring_with_threshold_minus_inf_is_dense_attention(ranks):
    _, results = ranks
    q, k, v = qkv()
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(torch.cat([r["ring_dense"] for r in results], 1), dense, atol=2e-5, rtol=1e-5)


def test_load_reports_and_resharding_across_ranks(ranks):
    world, results = ranks
    reference, whole = single_process(world)
    whole = copy.deepcopy(whole)
    per_head = head_work(whole)
    for r in results:
        assert torch.equal(r["head_work"], per_head)
        assert torch.equal(r["placed_work"], per_head)
        assert r["ulysses_report"] == results[0]["ulysses_report"]
        assert r["ring_report"] == results[0]["ring_report"]
    report = results[0]["ulysses_report"]
    assert len(report.per_rank) == world and sum(report.per_rank) == reference[-1][3]
    assert report.imbalance == pytest.approx(max(report.per_rank) / (sum(report.per_rank) / world))
    assert report.imbalance > 1.05, "sharper heads skip more: contiguous placement is unbalanced here"
    order = results[0]["order"]
    assert torch.equal(order, place_heads(per_head, world))
    local = HEADS // world
    loads = [int(per_head[order[r * local : (r + 1) * local]].sum()) for r in range(world)]
    assert max(loads) <= max(report.per_rank)
    for rank, r in enumerate(results):
        heads = order[rank * local : (rank + 1) * local]
        assert torch.equal(r["moved_read"], whole.read_list()[:, heads])
    # the call after the move equals a 4th single-process call
    q, k, v = qkv()
    kwargs = dict(threshold=THRESHOLDS[world], must_compute_queries=MUST_Q, must_compute_keys=MUST_K)
    with one_thread():
        out = lite_attention(q, k, v, whole, **kwargs)
    torch.testing.assert_close(torch.cat([r["after_move"][0] for r in results], 1), out, atol=1e-5, rtol=1e-5)
    for rank, r in enumerate(results):
        heads = order[rank * local : (rank + 1) * local]
        assert torch.equal(r["after_move"][1], whole.read_list()[:, heads])


def test_ulysses_refuses_heads_not_divisible_by_ranks(ranks):
    world, results = ranks
    assert f"got 3 heads on {world} ranks" in results[0]["odd_heads_error"]


def failing_worker(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_spawn_gloo_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="(?s)rank 1:.*boom on rank 1"):
        spawn_gloo(2, failing_worker, timeout_s=60)
