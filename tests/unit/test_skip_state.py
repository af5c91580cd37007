"""SkipState owns its lifecycle: sizing, call counting, forcing lists, counts and moving heads (kernels/state.py)."""

import pytest
import torch

from litepatch.kernels import SkipState, lite_attention


def _used_state(heads: int = 3, seq: int = 200) -> tuple[SkipState, torch.Tensor]:
    q = torch.randn(2, seq, heads, 16)
    state = SkipState()
    lite_attention(q, q, q, state, threshold=-2.0, backend="reference")
    return state, q


def test_counts_before_and_after_a_call():
    state = SkipState()
    assert state.kept_tiles() == 0 and not state.initialized
    with pytest.raises(ValueError, match="no buffers yet"):
        state.buffers()
    state, _ = _used_state()
    assert state.kept_tiles() == state.total_tiles()  # the first call computes every tile
    assert int(state.kept_count()) == state.kept_tiles() and state.heads == 3


def test_set_read_list_broadcasts_and_the_next_call_reads_it():
    state, q = _used_state()
    mask = torch.zeros(state.q_tiles, state.k_tiles, dtype=torch.bool)
    mask[:, 0] = True
    saved = state.read_words()
    state.set_read_list(mask)
    assert torch.equal(state.read_list(), mask.expand_as(state.read_list()))
    lite_attention(q, q, q, state, threshold=-2.0, backend="reference")
    assert state.kept_tiles() == 2 * 3 * state.q_tiles
    state.set_read_words(saved)
    assert torch.equal(state.read_words(), saved)


@pytest.mark.parametrize("order, calls, folded", [("anchor", 5, 1), ("alternate", 5, 3), ("alternate", 6, 2)])
def test_fold_calls_keeps_first_call_and_parity(order, calls, folded):
    state, _ = _used_state()
    state.calls = calls
    before = state.descending(order)
    state.fold_calls(order)
    assert state.calls == folded and state.descending(order) == before


def test_with_heads_moves_lists_and_counts_the_next_calls_work():
    state, _ = _used_state()
    mask = torch.rand(2, 3, state.q_tiles, state.k_tiles) < 0.5
    state.set_read_list(mask)
    moved = state.with_heads(lambda t: t[:, [2, 0]].contiguous())
    assert moved.heads == 2 and moved.shape == (2, 2, *state.shape[2:])
    assert torch.equal(moved.read_list(), mask[:, [2, 0]])
    assert moved.kept_tiles() == int(mask[:, [2, 0]].sum())
    with pytest.raises(ValueError, match="not been used yet"):
        SkipState().with_heads(lambda t: t)


@pytest.mark.parametrize("k_tiles", [1, 31, 32, 33, 64, 65, 591])
def test_a_new_state_lists_every_tile(k_tiles):
    """The first call's lists are made without pack_bits (fewer kernels); they must be the same words."""
    from litepatch.kernels.state import TileConfig, pack_bits

    state = SkipState()
    state.initialize((2, 3, 200, k_tiles * 64), TileConfig(128, 64), torch.device("cpu"), (), ())
    every_tile = pack_bits(torch.ones(k_tiles, dtype=torch.bool)).expand(2, 3, 2, -1)
    assert torch.equal(state.buffers().keep, every_tile)
    assert state.read_list().all()


@pytest.mark.parametrize("seq", [1, 17, 128, 129, 700, 4608])
@pytest.mark.parametrize("block_m, block_n", [(128, 64), (192, 128), (16, 16)])
def test_initial_anchor_is_the_key_tile_at_each_q_tiles_centre(seq, block_m, block_n):
    from litepatch.kernels.state import TileConfig, initial_anchor

    q_tiles, k_tiles = -(-seq // block_m), -(-seq // block_n)
    expected = [min(min(qt * block_m + block_m // 2, seq - 1) // block_n, k_tiles - 1) for qt in range(q_tiles)]
    anchor = initial_anchor(seq, seq, TileConfig(block_m, block_n), torch.device("cpu"))
    assert anchor.dtype == torch.int32 and anchor.tolist() == expected
    assert initial_anchor(seq, seq + 1, TileConfig(block_m, block_n), torch.device("cpu")).tolist() == [0] * q_tiles


def test_what_a_backend_derived_from_keep_is_forgotten_by_every_other_writer():
    """A backend may keep data derived from a state's lists on its keep tensor (the CuTe backend's next-call lists);
    a write by anyone else must drop it, or the next call would read lists of the old state."""
    from litepatch.kernels.state import derived_from, remember_derived

    class Lists:
        ready = True

        def invalidate(self):
            self.ready = False

        def nbytes(self):
            return 1000

    state, q = _used_state()
    lists, held = Lists(), state.nbytes()
    remember_derived(state.keep, lists)
    assert derived_from(state.keep) is lists and lists.ready and state.nbytes() == held + 1000
    assert derived_from(state.keep.clone()) is None  # a copied state does not carry it
    state.set_read_words(state.read_words())
    assert not lists.ready
    lists.ready = True
    lite_attention(q, q, q, state, threshold=-2.0, backend="reference")
    assert not lists.ready and derived_from(state.keep) is lists


def test_a_commit_a_backend_deferred_lands_before_the_state_is_read_or_written():
    """A backend may defer a call's commit (litepatch.kernels.commits): every read of the state, a write by another
    backend and the state's next call must settle it first, or they would see the lists before that call."""
    from litepatch.kernels.state import remember_derived

    class Deferred:
        pending = False
        settled = 0

        def settle(self):
            self.pending, self.settled = False, self.settled + 1

        def invalidate(self):
            pass

        def nbytes(self):
            return 0

    state, q = _used_state()
    deferred = Deferred()
    remember_derived(state.keep, deferred)
    reads = [state.buffers, state.kept_tiles, state.kept_count, state.kept_fraction, state.read_words,
             state.read_list, lambda: state.with_heads(lambda t: t),
             lambda: state.set_read_words(state.read_words()),
             lambda: lite_attention(q, q, q, state, threshold=-2.0, backend="reference")]
    for read in reads:
        deferred.pending = True
        settled = deferred.settled
        read()
        assert deferred.settled == settled + 1 and not deferred.pending, read
    read_now = deferred.settled
    state.read_list(), state.kept_fraction()  # nothing pending: nothing to settle
    assert deferred.settled == read_now
