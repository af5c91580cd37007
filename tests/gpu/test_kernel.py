"""The GPU LiteAttention forwards (Triton; CuTe-DSL on sm90 with flash-attn-4) against the PyTorch
reference (the oracle), on CUDA.

Each fuzz case runs several consecutive calls. Before each call both backends get the same state
(the reference's), so a difference cannot cascade; then they must agree:

* ``kept`` exactly, the output and LSE within FlashAttention-level tolerance;
* the written read list bit for bit, except *ties*: a tile whose skip test sits within
  ``TIE_LOG2`` (log2 units) of the threshold, found as the tiles where the reference itself decides
  differently at ``threshold - TIE_LOG2`` and ``threshold + TIE_LOG2`` (fp32 sums in another order
  move a score by ~1e-6 relative; the decisions of one call do not feed its own tests, so shifting
  the threshold is exactly "moving every test by that much");
* the anchor, except where the two tiles' largest scores differ by at most ``TIE_SCORE`` (relative).

A third of the cases carry a key-padding mask (valid key lengths per batch row, or a random boolean mask).
The cute backend runs its CuTe kernel (vote inside flash-attn-4's SM90 forward) without a mask or with a
prefix mask, the Triton kernel with a random one; both move the anchor like the reference, also at ``-inf``.
Each backend runs at its own tiles (cute: 192-row q-tiles at head dim 64, so its random-mask cases also run the
Triton kernel at 192 rows).

``LITEPATCH_FUZZ_CASES`` (default 500) sets the number of random cases.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from litepatch.kernels import SkipState, TileConfig, lite_attention, reference_forward, registry, unpack_bits
from litepatch.kernels.state import derived_from, normalize_ranges

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

triton_fwd = pytest.importorskip("litepatch.kernels.triton_fwd")
try:
    from litepatch.kernels import cute_fwd
except ImportError:
    cute_fwd = None
CUTE_RUNS = cute_fwd is not None and torch.cuda.get_device_capability()[0] == 9
FORWARDS = {"triton": triton_fwd.triton_forward}
if CUTE_RUNS:
    FORWARDS["cute"] = cute_fwd.cute_forward

TIE_LOG2 = 2e-3
TIE_SCORE = 1e-5
N_CASES = int(os.environ.get("LITEPATCH_FUZZ_CASES", "500"))
N_GROUPS = 20
THRESHOLDS = (-math.inf, -20.0, -10.0, -3.0, 0.0)
DEVICE = "cuda"


def _inputs(gen: torch.Generator, batch, seq_q, seq_k, heads, dim, dtype, layout):
    """Video-like q/k (nearby tokens score high, plus noise) so that the thresholds skip real tiles."""
    def positions(n):
        pos = torch.arange(n, device=DEVICE, dtype=torch.float32)[:, None]
        freqs = torch.randn(1, dim, device=DEVICE, generator=gen) * 0.05
        phase = torch.rand(1, dim, device=DEVICE, generator=gen) * 6.283
        return torch.cos(pos * freqs + phase)

    cpu = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), device=DEVICE, generator=gen)))
    sharp = float(torch.empty(()).uniform_(0.5, 3.0, generator=cpu))
    noise = float(torch.empty(()).uniform_(0.2, 1.5, generator=cpu))
    q = positions(seq_q)[None, :, None] * sharp * math.sqrt(dim) * 0.3 + noise * torch.randn(
        batch, seq_q, heads, dim, device=DEVICE, generator=gen)
    k = positions(seq_k)[None, :, None] * sharp + noise * torch.randn(batch, seq_k, heads, dim, device=DEVICE,
                                                                       generator=gen)
    v = torch.randn(batch, seq_k, heads, dim, device=DEVICE, generator=gen)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if layout == "bhsd":  # SDPA-layout caller: [B, H, S, D] storage handed over as a transposed view
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif layout == "fused":  # diffusers fused QKV projection: views into one [B, S, 3, H, D] buffer
        qkv = torch.stack([q, k, v], dim=2) if seq_q == seq_k else None
        if qkv is not None:
            q, k, v = qkv.unbind(2)
    return q, k, v


def _ranges(gen: torch.Generator, length: int):
    if float(torch.rand((), generator=gen)) < 0.6:
        return None
    out = []
    for _ in range(int(torch.randint(1, 3, (), generator=gen))):
        start = int(torch.randint(0, length, (), generator=gen))
        end = min(length, start + int(torch.randint(1, max(2, length // 8), (), generator=gen)))
        out.append((start, end))
    return out


def _case(index: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + index)
    pick = lambda seq: seq[int(torch.randint(len(seq), (), generator=gen))]  # noqa: E731
    big = index % 100 == 0  # a few long sequences, up to 20k (the reference's cost grows as S^2)
    seq_q = int(torch.randint(8000, 20001, (), generator=gen)) if big else int(
        math.exp(float(torch.empty(()).uniform_(0, math.log(3000), generator=gen))))
    seq_k = seq_q if float(torch.rand((), generator=gen)) < 0.85 else max(1, int(seq_q * float(
        torch.empty(()).uniform_(0.3, 2.0, generator=gen))))
    if index % 4 == 1:  # keys that fill their last 128-key tile: the CuTe kernel compiled without the tail mask
        aligned = -(-seq_k // 128) * 128
        seq_q, seq_k = (aligned if seq_q == seq_k else seq_q), aligned
    batch = 1 if big else pick((1, 2))
    heads = 1 if big else pick((1, 2, 3, 8, 16) if seq_q * seq_k < 1_000_000 else (1, 2, 4))
    mask = pick((None, None, None, None, "lengths", "random"))
    return dict(
        batch=batch, seq_q=seq_q, seq_k=seq_k, heads=heads, dim=pick((64, 128)), mask=mask,
        dtype=pick((torch.float16, torch.bfloat16)), threshold=pick(THRESHOLDS), order=pick(("anchor", "alternate")),
        layout=pick(("bshd", "bhsd", "fused")), calls=2 if big else int(torch.randint(2, 5, (), generator=gen)),
        must_q=_ranges(gen, seq_q), must_k=_ranges(gen, seq_k), seed=index,
    )


def _tile_max(q, k, b, h, qt, kt, tiles: TileConfig) -> float:
    rows = q[b, qt * tiles.block_m:(qt + 1) * tiles.block_m, h].double()
    cols = k[b, kt * tiles.block_n:(kt + 1) * tiles.block_n, h].double()
    return float((rows @ cols.T).max())


def _key_valid(gen: torch.Generator, kind, batch: int, seq_k: int):
    if kind is None:
        return None
    if kind == "lengths":
        lengths = torch.randint(1, seq_k + 1, (batch,), device=DEVICE, generator=gen)
        return torch.arange(seq_k, device=DEVICE)[None, :] < lengths[:, None]
    valid = torch.rand(batch, seq_k, device=DEVICE, generator=gen) < 0.7
    valid[:, 0] = True
    return valid


def _check_case(case: dict, stats: dict, backend: str = "triton") -> None:
    """Runs both backends' forwards call after call from the same state; see the module docstring."""
    gen = torch.Generator(device=DEVICE).manual_seed(case["seed"])
    q, k, v = _inputs(gen, case["batch"], case["seq_q"], case["seq_k"], case["heads"], case["dim"], case["dtype"],
                      case["layout"])
    key_valid = _key_valid(gen, case.get("mask"), case["batch"], case["seq_k"])
    tiles = registry.get(backend).tiles(case["dim"])  # the backend's own: cute takes 192-row q-tiles at D=64
    state = SkipState()
    state.initialize((case["batch"], case["heads"], case["seq_q"], case["seq_k"]), tiles, q.device,
                     normalize_ranges(case["must_q"], case["seq_q"], "q"),
                     normalize_ranges(case["must_k"], case["seq_k"], "k"))
    must_q, must_k = state.must_masks(q.device)
    keep, anchor = state.keep, state.anchor
    for call in range(case["calls"]):
        ctx = f"case {case} call {call}"
        args = dict(block_m=tiles.block_m, block_n=tiles.block_n, softmax_scale=1.0 / math.sqrt(case["dim"]),
                    use_anchor=case["order"] == "anchor", descending=case["order"] == "alternate" and call % 2 == 0)

        def run(forward, threshold):
            st = (keep.clone(), anchor.clone(), torch.full((), -1, dtype=torch.int64, device=DEVICE))
            out, lse = forward(q, k, v, *st, must_q, must_k, key_valid, threshold=threshold, **args)
            return out, lse, st

        out_r, lse_r, (keep_r, anchor_r, kept_r) = run(reference_forward, case["threshold"])
        out_o, lse_o, (keep_o, anchor_o, kept_o) = run(FORWARDS[backend], case["threshold"])
        assert int(kept_o) == int(kept_r), ctx
        assert out_o.shape == q.shape and out_o.dtype == q.dtype and out_o.is_contiguous(), ctx
        assert lse_o.shape == lse_r.shape and lse_o.dtype == torch.float32, ctx
        if key_valid is None or bool(key_valid.any(-1).all()):
            assert bool(torch.isfinite(out_o).all()), ctx
        diff = out_o.float() - out_r.float()
        rel = float(diff.norm() / out_r.float().norm().clamp_min(1e-6))
        max_abs = float(diff.abs().max())
        lse_err = float((lse_o - lse_r).abs().max())
        stats["max_rel"] = max(stats.get("max_rel", 0.0), rel)
        stats["max_abs"] = max(stats.get("max_abs", 0.0), max_abs)
        stats["lse"] = max(stats.get("lse", 0.0), lse_err)
        eps = 2.0 ** -8 if q.dtype == torch.bfloat16 else 2.0 ** -11  # unit roundoff of the dtype
        assert rel < 2 * eps, f"{ctx}: relative error {rel:.2e}"
        assert max_abs < 8 * eps * float(out_r.float().abs().max().clamp_min(1.0)), f"{ctx}: max abs {max_abs:.2e}"
        assert lse_err < 1e-3, f"{ctx}: lse error {lse_err:.2e}"
        # Read lists: bit for bit except ties at the threshold.
        if not torch.equal(keep_o, keep_r):
            assert case["threshold"] > -math.inf, f"{ctx}: threshold -inf must keep every tile"
            low = run(reference_forward, case["threshold"] - TIE_LOG2)[2][0]
            high = run(reference_forward, case["threshold"] + TIE_LOG2)[2][0]
            bad = (keep_o ^ keep_r) & ~(low ^ high)
            assert not bool(bad.any()), f"{ctx}: {int(bad.ne(0).sum())} keep words differ beyond ties"
            stats["tie_bits"] = stats.get("tie_bits", 0) + int(_popcount(keep_o ^ keep_r))
        for b, h, qt in (anchor_o != anchor_r).nonzero().tolist():
            a_o, a_r = int(anchor_o[b, h, qt]), int(anchor_r[b, h, qt])
            s_o, s_r = (_tile_max(q, k, b, h, qt, a, tiles) for a in (a_o, a_r))
            assert abs(s_o - s_r) <= TIE_SCORE * max(1.0, abs(s_r)), f"{ctx}: anchor {a_o} vs {a_r} ({s_o} vs {s_r})"
            stats["tie_anchors"] = stats.get("tie_anchors", 0) + 1
        stats["tiles"] = stats.get("tiles", 0) + state.total_tiles()
        stats["kept"] = stats.get("kept", 0) + int(kept_r)
        keep, anchor = keep_r, anchor_r


def _popcount(words: torch.Tensor) -> int:
    return int(unpack_bits(words, 32 * words.shape[-1]).sum())


@pytest.mark.parametrize("backend", list(FORWARDS))
@pytest.mark.parametrize("group", range(N_GROUPS))
def test_fuzz_against_reference(group, backend):
    stats: dict = {}
    cases = [_case(i) for i in range(group, N_CASES, N_GROUPS)]
    for case in cases:
        _check_case(case, stats, backend)
    print(f"{backend} group {group}: {len(cases)} cases, {stats}")


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
def test_cute_is_the_default_on_sm90_and_dense_calls_run_flash_attn_4():
    from litepatch.kernels import dense_attention, registry

    q = torch.randn(2, 3000, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    assert registry.select(q, 3000).name == "cute"
    lengths = torch.tensor([3000, 1234], device=DEVICE)
    mask = torch.arange(3000, device=DEVICE)[None, :] < lengths[:, None]
    for key_mask in (None, mask):
        out = dense_attention(q, q, q, key_mask=key_mask)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() for t in (q, q, q)),
            attn_mask=None if key_mask is None else key_mask[:, None, None, :]).transpose(1, 2)
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("threshold", [-3.0, 0.0])
def test_fuzz_inputs_make_the_kernel_skip(threshold):
    """The fuzz inputs exercise skipping (else the list comparison proves little), and it is exact."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q, k, v = _inputs(gen, 1, 3000, 3000, 2, 128, torch.bfloat16, "bshd")
    ours, ref = SkipState(), SkipState()
    for _ in range(3):
        lite_attention(q, k, v, ours, threshold=threshold, backend="triton")
        tiles = ours.tiles
        if not ref.initialized:
            ref.initialize(ours.shape, tiles, q.device, (), ())
        reference_forward(q, k, v, ref.keep, ref.anchor, ref.kept, *ref.must_masks(q.device), block_m=tiles.block_m,
                          block_n=tiles.block_n, threshold=threshold, softmax_scale=128 ** -0.5, use_anchor=True,
                          descending=False)
        assert torch.equal(ours.keep, ref.keep) and torch.equal(ours.anchor, ref.anchor)
    written = float(ours.read_list().float().mean())
    assert written < 0.95, f"threshold {threshold} kept {written:.3f} of the tiles"


def test_dense_matches_sdpa_long():
    """threshold=-inf equals dense attention (SDPA) at a long ragged shape, both dtypes."""
    for dtype in (torch.bfloat16, torch.float16):
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        q, k, v = (torch.randn(1, 9001, 4, 128, device=DEVICE, dtype=dtype, generator=gen) for _ in range(3))
        out, lse = lite_attention(q, k, v, SkipState(), threshold=-math.inf, return_lse=True)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
        ref = ref.transpose(1, 2)
        rel = float((out.float() - ref).norm() / ref.norm())
        assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3), rel
        scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) / math.sqrt(128)
        assert float((lse - scores.logsumexp(-1)).abs().max()) < 1e-3


def test_padded_query_rows_do_not_vote_and_state_updates_in_place():
    """seq = one full q-tile + 2 rows: the last q-tile's skip decisions come from 2 valid rows only."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    tiles = triton_fwd.tiles_for_head_dim(64)
    seq = tiles.block_m + 2
    q, k, v = _inputs(gen, 1, seq, seq, 2, 64, torch.bfloat16, "bshd")
    state = SkipState()
    state.initialize((1, 2, seq, seq), tiles, q.device, (), ())
    must = state.must_masks(q.device)
    keep_ptr = state.keep.data_ptr()
    for call in range(3):
        ref = (state.keep.clone(), state.anchor.clone(), state.kept.clone())
        args = dict(block_m=tiles.block_m, block_n=tiles.block_n, threshold=0.0, softmax_scale=0.125,
                    use_anchor=True, descending=False)
        reference_forward(q, k, v, *ref, *must, **args)
        triton_fwd.triton_forward(q, k, v, state.keep, state.anchor, state.kept, *must, **args)
        assert state.keep.data_ptr() == keep_ptr  # written in place
        assert torch.equal(state.keep, ref[0]), f"call {call}"
        assert torch.equal(state.anchor, ref[1]), f"call {call}"
        assert int(state.kept) == int(ref[2])


def test_unsupported_head_dim_is_refused_never_the_cpu_reference():
    """head_dim 96 on a GPU: no GPU backend takes it, and ``auto`` never falls back to the reference."""
    from litepatch.kernels import BackendUnavailable, registry

    q = torch.randn(1, 100, 2, 96, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="head_dim 96"):
        lite_attention(q, q, q, SkipState(), threshold=-3.0, backend="triton")
    reason = registry.refusal(q, 100)
    assert reason and "head_dim 96" in reason and "reference" not in reason


def test_torch_compile_fullgraph():
    """The custom op runs under torch.compile without graph breaks and matches eager."""
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    q, k, v = _inputs(gen, 1, 1000, 1000, 4, 128, torch.bfloat16, "bshd")
    eager, compiled = SkipState(), SkipState()
    lite_attention(q, k, v, eager, threshold=-3.0)
    lite_attention(q, k, v, compiled, threshold=-3.0)

    @torch.compile(fullgraph=True)
    def step(q, k, v):
        return lite_attention(q, k, v, compiled, threshold=-3.0)

    for _ in range(3):
        expected = lite_attention(q, k, v, eager, threshold=-3.0)
        got = step(q, k, v)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert torch.equal(compiled.keep, eager.keep)
        assert torch.equal(compiled.anchor, eager.anchor)
        assert int(compiled.kept) == int(eager.kept)


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
def test_prefix_mask_verdict_follows_in_place_writes():
    """The cute backend remembers whether a key mask is a prefix; a write into the mask must not be missed."""
    from litepatch.kernels import dense_attention

    gen = torch.Generator(device=DEVICE).manual_seed(13)
    q, k, v = (torch.randn(2, 1000, 2, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    mask = torch.arange(1000, device=DEVICE)[None, :] < torch.tensor([1000, 600], device=DEVICE)[:, None]

    def reference():
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() for t in (q, k, v)), attn_mask=mask[:, None, None, :])
        return ref.transpose(1, 2)

    for step in range(2):
        for out in (dense_attention(q, k, v, key_mask=mask),
                    lite_attention(q, k, v, SkipState(), threshold=-3.0, key_mask=mask)):
            ref = reference()
            assert float((out.float() - ref).norm() / ref.norm()) < 1e-2, f"step {step}"
        mask[1, 10] = False  # in place: no longer valid keys then padding


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
@pytest.mark.parametrize("threshold", [-math.inf, -3.0])
def test_reused_triton_launches_match_bound_ones(threshold):
    """The list and commit kernels launched through their reused compiled form (every call after a layer's first;
    on Triton 3.6 its C launcher directly) give the same outputs and states, bit for bit, as launches that Triton
    binds each time."""
    from litepatch.kernels import launch as launch_module

    gen = torch.Generator(device=DEVICE).manual_seed(17)
    q, k, v = _inputs(gen, 2, 1500, 1500, 2, 128, torch.bfloat16, "bshd")
    runs = {}
    for mode in ("reused", "bound"):
        state, outputs = SkipState(), []
        for _ in range(3):
            if mode == "bound":
                launch_module._RUNNERS.clear()
            outputs.append(lite_attention(q, k, v, state, threshold=threshold, backend="cute", return_lse=True))
            if mode == "reused":
                assert launch_module.cached_launches() >= 2  # the list and commit kernels
                direct = [entry[2] is not None for entry in launch_module._RUNNERS.values()]
                assert sum(direct) >= 2 or not launch_module.DIRECT  # on Triton 3.6: straight to the C launcher
        runs[mode] = (outputs, state)
    (reused, state), (bound, bound_state) = runs["reused"], runs["bound"]
    for (out, lse), (out_b, lse_b) in zip(reused, bound):
        assert torch.equal(out, out_b) and torch.equal(lse, lse_b)
    assert torch.equal(state.keep, bound_state.keep) and torch.equal(state.anchor, bound_state.anchor)
    assert int(state.kept) == int(bound_state.kept)


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
@pytest.mark.parametrize("order", ["anchor", "alternate"])
@pytest.mark.parametrize("threshold", [-math.inf, -3.0])
def test_own_lists_match_the_shared_scratch_and_see_other_writers(monkeypatch, threshold, order):
    """A small state keeps its own lists, which the commit after each call writes for the next one (one launch
    fewer): call after call, outputs and states equal those of calls through the shared scratch, bit for bit, and a
    read list forced between calls (another writer) is what the next call reads."""
    gen = torch.Generator(device=DEVICE).manual_seed(23)
    q, k, v = _inputs(gen, 2, 1500, 1500, 2, 128, torch.bfloat16, "bshd")
    runs = {}
    for limit in (1 << 20, 0):
        monkeypatch.setattr(cute_fwd, "OWN_LISTS_MAX_BYTES", limit)
        state, calls = SkipState(), []
        for call in range(6):
            if call == 3:  # every tile listed again: the next call computes all of them
                state.set_read_list(torch.ones(state.q_tiles, state.k_tiles, dtype=torch.bool))
            out = lite_attention(q, k, v, state, threshold=threshold, order=order, backend="cute", return_lse=True)
            calls.append((*out, state.keep.clone(), state.anchor.clone(), int(state.kept)))
            assert (derived_from(state.keep) is not None) == bool(limit)
            if call == 3:
                assert calls[-1][-1] == state.total_tiles()
        runs[limit] = calls
    for own, shared in zip(runs[1 << 20], runs[0]):
        assert all(torch.equal(a, b) for a, b in zip(own[:4], shared[:4])) and own[4] == shared[4]


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
@pytest.mark.parametrize("threshold", [-math.inf, -3.0])
def test_repeated_calls_match_calls_through_the_forward(monkeypatch, threshold):
    """After a state's first call, lite_attention repeats the CuTe backend's call on each call's new inputs
    (``Backend.repeat``: the compiled kernel and the commit launch with their arguments found once). Outputs and
    states equal those of the same calls through ``cute_forward``, bit for bit; inputs TMA cannot read as they are
    go through ``cute_forward`` (which copies them), and the call after it is repeated again. A call that drops the
    LSE is repeated too, and the LSEs of the others are each their own tensor."""
    from litepatch.kernels import interface

    gen = torch.Generator(device=DEVICE).manual_seed(29)
    calls = [_inputs(gen, 2, 1500, 1500, 2, 128, torch.bfloat16, "bshd") for _ in range(5)]
    shape = calls[3][0].shape
    flat = torch.empty(math.prod(shape) + 1, device=DEVICE, dtype=torch.bfloat16)
    misaligned = flat[1:].view(shape)
    misaligned.copy_(calls[3][0])
    calls[3] = (misaligned, *calls[3][1:])
    launched = []
    run_sm90 = cute_fwd.run_sm90
    monkeypatch.setattr(cute_fwd, "run_sm90", lambda *args, **kwargs: launched.append(1) or run_sm90(*args, **kwargs))
    runs = {}
    for repeat in (True, False):
        if not repeat:
            monkeypatch.setattr(interface._Repeat, "of", classmethod(lambda cls, *args: None))
        launched.clear()
        state, results = SkipState(), []
        for index, (q, k, v) in enumerate(calls):
            wanted = index != 2  # a call that drops the LSE: the repeat writes it into a buffer it reuses
            result = lite_attention(q, k, v, state, threshold=threshold, backend="cute", return_lse=wanted)
            out, lse = result if wanted else (result, torch.zeros(()))
            results.append((out, lse, state.keep.clone(), state.anchor.clone(), int(state.kept)))
        runs[repeat] = results
        assert len(launched) == (2 if repeat else 5)  # the first call and the misaligned one
        # every LSE a caller asked for is its own tensor, never the reused one
        assert len({lse.data_ptr() for _, lse, *_ in results if lse.dim()}) == len(calls) - 1
    for repeated, forward in zip(runs[True], runs[False]):
        assert all(torch.equal(a, b) for a, b in zip(repeated[:4], forward[:4])) and repeated[4] == forward[4]


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
def test_commits_deferred_in_a_window_match_commits_made_at_once():
    """Inside a commit window (a patched forward holds one open) repeated calls defer their commits, which go out as
    one batch launch per group of options when the window closes: outputs and states equal those of the same calls
    committed at once, bit for bit, also for a state read while its commit waits."""
    from litepatch.kernels import commits

    gen = torch.Generator(device=DEVICE).manual_seed(31)
    forms = [(2, 1500, 2, 128, -3.0), (1, 2000, 4, 64, -3.0), (2, 1500, 2, 128, -math.inf)]
    calls = [[_inputs(gen, batch, seq, seq, heads, dim, torch.bfloat16, "bshd") for batch, seq, heads, dim, _ in forms]
             for _ in range(4)]
    batches, read_while_waiting = [], []
    launch = cute_fwd.launch

    def counted(kernel, *args, **kwargs):
        batches.append(kernel is cute_fwd._commit_relist_batch_kernel)
        return launch(kernel, *args, **kwargs)

    runs = {}
    for deferred in (True, False):
        states, results = [SkipState() for _ in forms], []
        for call, inputs in enumerate(calls):
            if deferred:
                commits.open_window()
            for i, ((q, k, v), form) in enumerate(zip(inputs, forms)):
                results += lite_attention(q, k, v, states[i], threshold=form[-1], backend="cute", return_lse=True)
                if deferred and call == 2 and i == 0:
                    read_while_waiting.append(states[0].read_list())  # its commit waits: it lands first
            if deferred:
                cute_fwd.launch = counted
                commits.close_window()
                cute_fwd.launch = launch
            results += [t.clone() for state in states for t in (state.keep, state.anchor, state.kept)]
        runs[deferred] = results
    assert sum(batches) == 3 * 2  # at each close after the first round: one batch per group of options (two)
    assert all(torch.equal(a, b) for a, b in zip(runs[True], runs[False]))
    per_round = 5 * len(forms)  # out and lse of each call, then keep, anchor and kept of each state
    keep_after = runs[False][2 * per_round + 2 * len(forms)]  # state 0's keep after the third round
    assert torch.equal(read_while_waiting[0], unpack_bits(keep_after, read_while_waiting[0].shape[-1]))


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
@pytest.mark.parametrize("own_lists", [True, False])
def test_calls_on_two_streams_at_once_match_the_same_calls_in_turn(monkeypatch, own_lists):
    """The CuTe backend's scratch (lists, votes, anchor slots) is one per stream (or the state's own): two models'
    calls on two streams of one device, queued without waiting for each other, give the outputs and states of the
    same calls made in turn."""
    monkeypatch.setattr(cute_fwd, "OWN_LISTS_MAX_BYTES", (1 << 20) if own_lists else 0)
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    inputs = [_inputs(gen, 1, 4000, 4000, 8, 128, torch.bfloat16, "bshd"),
              _inputs(gen, 2, 3000, 3000, 4, 64, torch.bfloat16, "bshd")]

    def run(streams):
        states, outputs = [SkipState(), SkipState()], [[], []]
        for _ in range(4):
            for i, (q, k, v) in enumerate(inputs):
                with torch.cuda.stream(streams[i]):
                    outputs[i].append(lite_attention(q, k, v, states[i], threshold=-3.0, backend="cute"))
        torch.cuda.synchronize()
        return outputs, states

    default = torch.cuda.current_stream()
    side = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in side:
        stream.wait_stream(default)  # the inputs are ready
    (in_turn, states_in_turn), (at_once, states_at_once) = run([default, default]), run(side)
    for outs, outs_b in zip(in_turn, at_once):
        assert all(torch.equal(a, b) for a, b in zip(outs, outs_b))
    for a, b in zip(states_in_turn, states_at_once):
        assert torch.equal(a.keep, b.keep) and torch.equal(a.anchor, b.anchor) and int(a.kept) == int(b.kept)


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_direct_dense_launch_is_flash_attn_4s_own_kernel(head_dim):
    """Dense calls launch flash-attn-4's kernel directly: bit-identical to its interface, with and without key
    lengths, and on strided views (a fused projection's slices) as on contiguous inputs."""
    from flash_attn.cute import interface as fa4

    gen = torch.Generator(device=DEVICE).manual_seed(19)
    fused = torch.randn(2, 3001, 3, 4, head_dim, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    views = fused.unbind(2)  # [B, S, H, D] views with the sequence stride of three heads' worth
    lengths = torch.tensor([3001, 1234], device=DEVICE, dtype=torch.int32)
    mask = torch.arange(3001, device=DEVICE)[None, :] < lengths[:, None]
    for inputs in (views, tuple(t.contiguous() for t in views)):
        for seqused, key_mask in ((None, None), (lengths, mask)):
            ours = cute_fwd.flash_attn_4_dense(*inputs, key_mask=key_mask)
            theirs = fa4._flash_attn_fwd(*(t.contiguous() for t in inputs), seqused_k=seqused)[0]
            assert torch.equal(ours, theirs)


@pytest.mark.skipif(not CUTE_RUNS, reason="needs sm90 and flash-attn-4 (pip install 'litepatch[cuda]')")
def test_inputs_tma_cannot_read_as_they_are_are_copied_not_misread():
    """A misaligned start (a view one element into a buffer) or an odd stride cannot be read by TMA: the CuTe
    kernels get aligned copies, so dense and sparse calls still equal the reference."""
    from litepatch.kernels import dense_attention
    from litepatch.kernels.tma import tma_ready

    gen = torch.Generator(device=DEVICE).manual_seed(23)
    shape = (1, 1000, 2, 128)
    numel = math.prod(shape)
    flat = torch.randn(3 * numel + 1, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    misaligned = [flat[1 + i * numel: 1 + (i + 1) * numel].view(shape) for i in range(3)]
    odd = torch.randn(1, 1000, 2, 131, device=DEVICE, dtype=torch.bfloat16, generator=gen)[..., :128]
    for q, k, v in (misaligned, (odd, misaligned[1], odd)):
        assert not tma_ready(q)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
        state = SkipState()
        for out in (dense_attention(q, k, v), lite_attention(q, k, v, state, threshold=-3.0, backend="cute")):
            assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
