"""Single-process parts of litepatch.parallel: LSE merge, range shifting, chunked (ring) semantics, load balance."""

import math

import pytest
import torch
import torch.nn.functional as F

from litepatch.kernels import SkipState, lite_attention
from litepatch.parallel import (
    ChunkedSkipState,
    chunked_lite_attention,
    gather_head_work,
    head_work,
    imbalance_ratio,
    kept_tiles,
    load_report,
    merge_partials,
    place_heads,
    reshard_ulysses_state,
    ring_lite_attention,
    shard_ranges,
    ulysses_attention,
    ulysses_lite_attention,
)


def local_qkv(batch=1, seq=512, heads=4, dim=64, seed=0, sharpness=None):
    """Video-like q/k (scores peak where positions are close), a different sharpness per head."""
    gen = torch.Generator().manual_seed(seed)
    sharpness = sharpness or [1.0 + 1.5 * h for h in range(heads)]
    pos = torch.arange(seq, dtype=torch.float32)[:, None]
    freqs = torch.logspace(-2.2, -0.5, dim // 2)[None, :]
    feats = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=-1)  # [S, D]
    sharp = torch.tensor(sharpness, dtype=torch.float32)[None, :, None, None]
    q = feats * sharp + 0.3 * torch.randn(batch, heads, seq, dim, generator=gen)
    k = feats * sharp + 0.3 * torch.randn(batch, heads, seq, dim, generator=gen)
    v = torch.randn(batch, heads, seq, dim, generator=gen)
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def sdpa_lse(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.logsumexp(scores, dim=-1)


# ---------------------------------------------------------------------------------------------------------- merge


def test_merge_partials_equals_attention_over_the_union_of_keys():
    q, k, v = local_qkv(seq=192, heads=2)
    parts = [(k[:, :64], v[:, :64]), (k[:, 64:100], v[:, 64:100]), (k[:, 100:], v[:, 100:])]
    outs = [sdpa(q, kk, vv) for kk, vv in parts]
    lses = [sdpa_lse(q, kk, vv).float() for kk, vv in parts]
    out, lse = merge_partials(outs, lses)
    torch.testing.assert_close(out, sdpa(q, k, v), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, sdpa_lse(q, k, v).float(), atol=1e-5, rtol=1e-6)
    assert out.dtype == q.dtype and lse.dtype == torch.float32


def test_merge_partials_ignores_parts_that_saw_no_key():
    out_a, out_b = torch.randn(1, 4, 2, 8), torch.full((1, 4, 2, 8), float("nan"))
    lse_a = torch.randn(1, 2, 4)
    lse_b = torch.full((1, 2, 4), -math.inf)
    lse_b[0, 0, 0] = lse_a[0, 0, 0]  # one row seen by both halves: equal weights
    out_b[0, 0, 0] = 1.0
    out, lse = merge_partials([out_a, out_b], [lse_a, lse_b])
    assert not out.isnan().any()
    torch.testing.assert_close(out[0, 1:], out_a[0, 1:])
    torch.testing.assert_close(out[0, 0, 1], out_a[0, 0, 1])
    torch.testing.assert_close(out[0, 0, 0], (out_a[0, 0, 0] + 1.0) / 2)
    torch.testing.assert_close(lse[0, 0, 0], lse_a[0, 0, 0] + math.log(2))
    empty, empty_lse = merge_partials([out_b], [torch.full((1, 2, 4), -math.inf)])
    assert empty_lse.isneginf().all()


def test_merge_partials_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one LSE per output"):
        merge_partials([torch.zeros(1, 4, 2, 8)], [])
    with pytest.raises(ValueError, match=r"lse \(1, 4, 2\)"):
        merge_partials([torch.zeros(1, 4, 2, 8)], [torch.zeros(1, 4, 2)])


# --------------------------------------------------------------------------------------------------------- ranges


def test_shard_ranges_clips_and_shifts_into_local_coordinates():
    assert shard_ranges([(0, 10), (250, 300)], start=0, length=256) == ((0, 10), (250, 256))
    assert shard_ranges([(0, 10), (250, 300)], start=256, length=256) == ((0, 44),)
    assert shard_ranges([(0, 10)], start=256, length=256) == ()
    assert shard_ranges(None, start=0, length=8) == ()
    with pytest.raises(ValueError, match=r"\(500, 600\) is outside \[0, 512\)"):
        shard_ranges([(500, 600)], start=0, length=256, total=512)


# ---------------------------------------------------------------------------------------------- chunked semantics


def test_chunked_with_threshold_minus_inf_is_dense_attention():
    q, k, v = local_qkv(seq=384, heads=2)
    states = ChunkedSkipState()
    for _ in range(2):
        out, lse = chunked_lite_attention(q, k, v, states, n_chunks=3, threshold=-math.inf, return_lse=True)
        torch.testing.assert_close(out, sdpa(q, k, v), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse, sdpa_lse(q, k, v).float(), atol=2e-5, rtol=1e-6)
    assert states.keys() == [(i, c) for i in range(3) for c in range(3)]
    assert all(s.read_list().all() for s in states.values())


def test_chunked_equals_per_chunk_calls_merged_by_lse():
    """The definition, spelled out: one lite_attention per (query shard, K/V chunk), merged by LSE."""
    q, k, v = local_qkv(seq=512, heads=2)
    states, manual = ChunkedSkipState(), {}
    for call in range(3):
        out = chunked_lite_attention(q, k, v, states, n_chunks=2, threshold=-3.0)
        expected = []
        for i in range(2):
            parts = []
            for c in range(2):
                state = manual.setdefault((i, c), SkipState())
                parts.append(lite_attention(
                    q[:, i * 256 : (i + 1) * 256], k[:, c * 256 : (c + 1) * 256], v[:, c * 256 : (c + 1) * 256],
                    state, threshold=-3.0, return_lse=True,
                ))
            expected.append(merge_partials([p[0] for p in parts], [p[1] for p in parts])[0])
        torch.testing.assert_close(out, torch.cat(expected, dim=1), atol=0, rtol=0)
        for key, state in manual.items():
            assert torch.equal(states[key].read_list(), state.read_list()), (call, key)
    assert not all(s.read_list().all() for s in states.values()), "the case must skip something"


def test_chunked_differs_from_unchunked_skipping_but_stays_close():
    """The running max restarts per chunk: lists differ from the unchunked run; every chunk keeps a tile."""
    q, k, v = local_qkv(seq=512, heads=2)
    whole, chunked = SkipState(), ChunkedSkipState()
    for _ in range(3):
        out_whole = lite_attention(q, k, v, whole, threshold=-3.0)
        out_chunked = chunked_lite_attention(q, k, v, chunked, n_chunks=2, threshold=-3.0)
    glued = torch.cat([torch.cat([chunked[i, 0].read_list(), chunked[i, 1].read_list()], -1) for i in range(2)], -2)
    assert glued.shape == whole.read_list().shape
    assert not torch.equal(glued, whole.read_list())
    for state in chunked.values():
        assert state.read_list().any(-1).all(), "a chunk's first visited tile is never skippable"
    ref = sdpa(q, k, v)
    err_whole = (out_whole - ref).norm() / ref.norm()
    err_chunked = (out_chunked - ref).norm() / ref.norm()
    assert err_whole < 0.05 and err_chunked < 0.05


def test_chunked_must_compute_ranges_are_shifted_into_each_chunk():
    q, k, v = local_qkv(seq=512, heads=2)
    states = ChunkedSkipState()
    for _ in range(3):
        chunked_lite_attention(
            q, k, v, states, n_chunks=2, threshold=0.0, must_compute_keys=[(300, 330)], must_compute_queries=[(0, 5)]
        )
    # key tiles (block_n=64) of 300..329 are global tiles 4 and 5 -> chunk 1, local tokens 44..73, tiles 0 and 1
    for i in range(2):
        assert states[i, 1].must_compute_keys == ((44, 74),)
        assert states[i, 1].read_list()[..., :2].all()
        assert states[i, 0].must_compute_keys == ()
    assert states[0, 0].must_compute_queries == ((0, 5),) and states[1, 0].must_compute_queries == ()
    assert states[0, 0].read_list()[:, :, 0].all() and states[0, 1].read_list()[:, :, 0].all()
    # without the ranges those tiles are dropped somewhere, so the test above can fail
    bare = ChunkedSkipState()
    for _ in range(3):
        chunked_lite_attention(q, k, v, bare, n_chunks=2, threshold=0.0)
    assert not bare[0, 1].read_list()[..., :2].all() or not bare[0, 0].read_list()[:, :, 0].all()


def test_chunked_rejects_indivisible_sequences():
    q, k, v = local_qkv(seq=100, heads=1)
    with pytest.raises(ValueError, match="divisible by n_chunks=3"):
        chunked_lite_attention(q, k, v, ChunkedSkipState(), n_chunks=3)


def test_one_rank_without_distributed_is_plain_lite_attention():
    q, k, v = local_qkv(seq=256, heads=2)
    a, b, states = SkipState(), SkipState(), ChunkedSkipState()
    for _ in range(2):
        ref = lite_attention(q, k, v, a, threshold=-3.0)
        torch.testing.assert_close(ulysses_lite_attention(q, k, v, b, threshold=-3.0), ref, atol=0, rtol=0)
        out = ring_lite_attention(q, k, v, states, threshold=-3.0)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(a.read_list(), b.read_list()) and torch.equal(a.read_list(), states[0, 0].read_list())


def test_ulysses_head_order_keeps_outputs_in_the_original_order():
    q, k, v = local_qkv(seq=128, heads=4)
    out, lse = ulysses_attention(
        q, k, v, lambda q, k, v: (sdpa(q, k, v), sdpa_lse(q, k, v).float()), head_order=[2, 0, 3, 1],
        return_lse=True,
    )
    torch.testing.assert_close(out, sdpa(q, k, v))
    torch.testing.assert_close(lse, sdpa_lse(q, k, v).float())
    with pytest.raises(ValueError, match="permutation of range\\(4\\)"):
        ulysses_attention(q, k, v, sdpa, head_order=[0, 0, 1, 2])


# ---------------------------------------------------------------------------------------------------- load balance


def test_imbalance_ratio_and_load_report():
    assert imbalance_ratio([30, 10]) == 1.5
    assert imbalance_ratio([5, 5, 5]) == 1.0
    assert imbalance_ratio([0, 0]) == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        imbalance_ratio([-1, 2])
    report = load_report(7)
    assert report.per_rank == (7,) and report.imbalance == 1.0 and "rank 0: 7" in str(report)


def test_kept_tiles_and_head_work_count_the_states_work():
    q, k, v = local_qkv(seq=512, heads=4)
    state = SkipState()
    with pytest.raises(ValueError, match="run one call first"):
        head_work(state)
    assert kept_tiles(state) == 0
    lite_attention(q, k, v, state, threshold=-2.0)
    assert kept_tiles(state) == 4 * 4 * 8  # first call: every tile (4 heads x 4 q-tiles x 8 k-tiles)
    work = head_work(state)
    assert work.shape == (4,) and int(work.sum()) == int(state.read_list().sum())
    lite_attention(q, k, v, state, threshold=-2.0)
    assert kept_tiles(state) == int(work.sum())
    assert torch.equal(gather_head_work(state), head_work(state))
    chunked = ChunkedSkipState()
    chunked_lite_attention(q, k, v, chunked, n_chunks=2)
    assert kept_tiles(chunked) == sum(kept_tiles(s) for s in chunked.values()) == 4 * 4 * 8


def test_place_heads_lowers_imbalance_on_a_skewed_case():
    """Sharp heads skip much more: contiguous placement piles the dense heads on rank 0."""
    q, k, v = local_qkv(seq=512, heads=4, sharpness=[0.2, 0.3, 6.0, 7.0])
    state = SkipState()
    for _ in range(3):
        lite_attention(q, k, v, state, threshold=-1.0)
    work = head_work(state)
    contiguous = imbalance_ratio([int(work[:2].sum()), int(work[2:].sum())])
    order = place_heads(work, world_size=2)
    placed = imbalance_ratio([int(work[order[:2]].sum()), int(work[order[2:]].sum())])
    assert contiguous > 1.2, work
    assert placed < contiguous and placed < 1.1, (work, order)
    assert sorted(order.tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "work, world, expected",
    [([8, 7, 1, 1], 2, [0, 3, 1, 2]), ([1, 1, 1, 1], 2, [0, 1, 2, 3]), ([5, 1, 4, 2, 3, 0], 3, [0, 5, 1, 2, 3, 4])],
)
def test_place_heads_is_greedy_lpt_with_equal_head_counts(work, world, expected):
    assert place_heads(work, world).tolist() == expected


def test_place_heads_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="5 heads and 2 ranks"):
        place_heads([1, 2, 3, 4, 5], 2)


def test_reshard_on_one_rank_permutes_nothing_but_copies_the_lists():
    q, k, v = local_qkv(seq=256, heads=2)
    state = SkipState()
    for _ in range(2):
        lite_attention(q, k, v, state, threshold=-2.0)
    moved = reshard_ulysses_state(state, None, [1, 0])  # one rank owns every head: the order is its own
    assert torch.equal(moved.read_list(), state.read_list()[:, [1, 0]])
    assert int(moved.kept) == int(state.read_list().sum()) and moved.calls == state.calls
