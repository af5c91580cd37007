"""Context parallelism at 4 and 8 ranks (issue 18), emulated with gloo on CPU and the reference kernel.

Every Ulysses x ring layout of the world (4 ranks: 4x1, 2x2, 1x4; 8 ranks: 8x1, 4x2, 2x4, 1x8) through
``litepatch.parallel.ulysses_ring_lite_attention`` against the single-process *chunked* run with
``n_chunks = ring_degree`` (which is plain ``lite_attention`` for ``ring_degree = 1``): outputs and LSE within float
tolerance, and each rank's (ring shard, K/V chunk) read lists equal to the chunked run's lists of its heads, over
calls that skip; with ``threshold=-inf`` every layout is dense attention. Head placement by kept work
(``place_heads`` + ``reshard_ulysses_state``) on heads of very different sharpness: the same outputs and per-head
lists as contiguous placement, and a measured imbalance (``load_report``) no worse, strictly better where the
placement can move anything. The 8-rank runs are marked slow.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from test_parallel_gloo import one_thread

from litepatch.kernels import SkipState
from litepatch.parallel import (
    ChunkedSkipState,
    chunked_lite_attention,
    contiguous_head_order,
    gather_head_work,
    load_report,
    place_heads,
    reshard_ulysses_state,
    spawn_gloo,
    ulysses_lite_attention,
    ulysses_ring_groups,
    ulysses_ring_lite_attention,
)

SEQ, HEADS, DIM, CALLS = 1024, 8, 32, 3
# ring_degree -> threshold: a ring of 4 or 8 leaves 128-256-token chunks (2-4 key tiles, the first visit of each
# protected), where only an aggressive threshold skips (the chunked-vs-unchunked difference of litepatch.parallel)
THRESHOLDS = {1: -3.0, 2: -3.0, 4: 0.0, 8: 0.0}
MUST_Q, MUST_K = [(130, 140)], [(600, 630)]
LAYOUTS = {4: [(4, 1), (2, 2), (1, 4)], 8: [(8, 1), (4, 2), (2, 4), (1, 8)]}
# the sharpness of each head, heavy (blurry: little to skip) and light (sharp) heads side by side, so contiguous
# placement puts the heavy ones together
SHARPNESS = (0.2, 0.3, 0.4, 0.5, 6.0, 7.0, 8.0, 9.0)


def qkv(heads: int = HEADS, seq: int = SEQ, sharpness=SHARPNESS):
    """Video-like q/k (scores peak where positions are close), sharper for some heads than others; every rank
    builds the same tensors and takes its shard."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(seq, dtype=torch.float32)[:, None]
    freqs = torch.logspace(-2.2, -0.5, DIM // 2)[None, :]
    feats = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=-1)
    sharp = torch.tensor([sharpness[h % len(sharpness)] for h in range(heads)])[None, :, None, None]
    q = feats * sharp + 0.3 * torch.randn(1, heads, seq, DIM, generator=gen)
    k = feats * sharp + 0.3 * torch.randn(1, heads, seq, DIM, generator=gen)
    v = torch.randn(1, heads, seq, DIM, generator=gen)
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[1] // world
    return t[:, rank * n : (rank + 1) * n]


def layouts_worker(rank: int, world: int) -> dict:
    """Every layout of this world on one rank: outputs and read lists of ``CALLS`` calls, and a dense call."""
    q, k, v = (shard(t, rank, world) for t in qkv())
    res = {}
    for ulysses, ring in LAYOUTS[world]:
        groups = ulysses_ring_groups(ulysses, ring)
        states, calls = ChunkedSkipState(), []
        for _ in range(CALLS):
            out, lse = ulysses_ring_lite_attention(
                q, k, v, states, groups=groups, threshold=THRESHOLDS[ring], return_lse=True,
                must_compute_queries=MUST_Q, must_compute_keys=MUST_K,
            )
            calls.append((out, lse, {key: s.read_list() for key, s in states.items()}))
        dense = ulysses_ring_lite_attention(q, k, v, ChunkedSkipState(), groups=groups, threshold=-math.inf)
        res[ulysses, ring] = {
            "calls": calls, "dense": dense, "ring_rank": groups.ring_rank, "ulysses_rank": groups.ulysses_rank,
        }
    return res


def placement_worker(rank: int, world: int) -> dict:
    """Ulysses-P over ``2 P`` heads of different sharpness: two calls under contiguous placement, then the placement
    by kept work, the state moved, and one more call under each placement."""
    heads = 2 * world
    q, k, v = (shard(t, rank, world) for t in qkv(heads=heads))
    kw = dict(threshold=-3.0, must_compute_queries=MUST_Q, must_compute_keys=MUST_K)
    state = SkipState()
    for _ in range(2):
        ulysses_lite_attention(q, k, v, state, **kw)
    order = place_heads(gather_head_work(state), world)
    moved = reshard_ulysses_state(state, None, order)
    contiguous = copy.deepcopy(state)
    out_contiguous = ulysses_lite_attention(q, k, v, contiguous, **kw)
    out_placed = ulysses_lite_attention(q, k, v, moved, head_order=order, **kw)
    return {
        "order": order,
        "contiguous": (out_contiguous, contiguous.read_list(), load_report(contiguous)),
        "placed": (out_placed, moved.read_list(), load_report(moved)),
    }


@functools.lru_cache
@one_thread()
def chunked(ring: int):
    """The single-process target of ring degree ``ring``: ``CALLS`` chunked calls, their outputs, LSE and lists."""
    q, k, v = qkv()
    states, calls = ChunkedSkipState(), []
    for _ in range(CALLS):
        out, lse = chunked_lite_attention(
            q, k, v, states, n_chunks=ring, threshold=THRESHOLDS[ring], return_lse=True,
            must_compute_queries=MUST_Q, must_compute_keys=MUST_K,
        )
        calls.append((out, lse, {key: s.read_list() for key, s in states.items()}))
    return calls


def dense_attention():
    q, k, v = qkv()
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@functools.lru_cache
def layouts_run(world: int) -> list[dict]:
    return spawn_gloo(world, layouts_worker, timeout_s=240)


def check_layouts(world: int) -> None:
    results = layouts_run(world)
    dense = dense_attention()
    for ulysses, ring in LAYOUTS[world]:
        reference = chunked(ring)
        local = HEADS // ulysses
        assert not all(read.all() for read in reference[-1][2].values()), f"{ulysses}x{ring}: the case must skip"
        for call, (out, lse, reads) in enumerate(reference):
            # global rank g holds sequence shard g
            got_out = torch.cat([r[ulysses, ring]["calls"][call][0] for r in results], dim=1)
            got_lse = torch.cat([r[ulysses, ring]["calls"][call][1] for r in results], dim=2)
            torch.testing.assert_close(got_out, out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_lse, lse, atol=1e-5, rtol=1e-5)
            for g, r in enumerate(results):
                layout = r[ulysses, ring]
                i, u = layout["ring_rank"], layout["ulysses_rank"]
                assert (i, u) == (g // ulysses, g % ulysses)
                mine = layout["calls"][call][2]
                assert sorted(mine) == [(i, c) for c in range(ring)], (ulysses, ring, g, sorted(mine))
                for key, read in mine.items():
                    assert torch.equal(read, reads[key][:, u * local : (u + 1) * local]), (ulysses, ring, call, g, key)
        got_dense = torch.cat([r[ulysses, ring]["dense"] for r in results], dim=1)
        torch.testing.assert_close(got_dense, dense, atol=2e-5, rtol=1e-5)


def check_placement(world: int) -> None:
    results = spawn_gloo(world, placement_worker, timeout_s=240)
    heads, local = 2 * world, 2
    order = results[0]["order"]
    assert all(torch.equal(r["order"], order) for r in results)
    assert not torch.equal(order, contiguous_head_order(heads)), "the heterogeneous case must move heads"
    out_c = torch.cat([r["contiguous"][0] for r in results], dim=1)
    out_p = torch.cat([r["placed"][0] for r in results], dim=1)
    torch.testing.assert_close(out_p, out_c, atol=1e-5, rtol=1e-5)
    read_c = torch.cat([r["contiguous"][1] for r in results], dim=1)  # contiguous: rank order is head order
    read_p = torch.empty_like(read_c)
    for rank, r in enumerate(results):
        read_p[:, order[rank * local : (rank + 1) * local]] = r["placed"][1]
    assert torch.equal(read_p, read_c)
    report_c, report_p = results[0]["contiguous"][2], results[0]["placed"][2]
    assert sum(report_c.per_rank) == sum(report_p.per_rank) == int(read_c.sum())
    assert report_c.imbalance > 1.05, f"contiguous placement must be unbalanced here: {report_c}"
    assert report_p.imbalance < report_c.imbalance, (str(report_c), str(report_p))


def test_every_layout_of_4_ranks_equals_the_chunked_single_process_run():
    check_layouts(4)


@pytest.mark.slow
def test_every_layout_of_8_ranks_equals_the_chunked_single_process_run():
    check_layouts(8)


def test_head_placement_on_4_ranks_keeps_outputs_and_lowers_the_imbalance():
    check_placement(4)


@pytest.mark.slow
def test_head_placement_on_8_ranks_keeps_outputs_and_lowers_the_imbalance():
    check_placement(8)


def test_ulysses_ring_groups_refuses_a_layout_that_is_not_the_world():
    with pytest.raises(ValueError, match=r"must equal the world size, got 2 x 2 on 1 ranks"):
        ulysses_ring_groups(2, 2)
    with pytest.raises(ValueError, match="degrees must be >= 1"):
        ulysses_ring_groups(0, 1)
    groups = ulysses_ring_groups(1, 1)
    q, k, v = qkv(heads=2, seq=256)
    states = ChunkedSkipState()
    out = ulysses_ring_lite_attention(q, k, v, states, groups=groups, threshold=-math.inf)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-5)
    assert states.keys() == [(0, 0)]
