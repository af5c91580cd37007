"""The CuTe backend's scratch protocol, checked on the CPU: run by ``test_cute_protocol.py`` under Triton's
interpreter (``TRITON_INTERPRET=1``, set before Triton is imported).

:func:`litepatch.kernels.cute_fwd.cute_forward` runs its list and commit kernels (Triton, interpreted on CPU
tensors) around :func:`emulated_sm90`, a plain PyTorch statement of what the CuTe kernel must do with the
scratch buffers: walk each list from last entry to first, count visits, mask the visit at the tail position by
key length, vote per visit position, and fold the anchor candidate ``(score, 65535 - position)`` into the slot.
Over several calls the state must equal :func:`~litepatch.kernels.reference.reference_forward`'s bit for bit.
A failure here is in the protocol (lists, positions, commit); one that only the GPU fuzz test shows is in the
CuTe kernel itself.

Usage: ``TRITON_INTERPRET=1 python tests/unit/cute_protocol_check.py`` (exit status 1 on a mismatch).
"""

from __future__ import annotations

import itertools
import math
import sys
import threading

import torch

from litepatch.kernels import SkipState, cute_fwd, reference_forward
from litepatch.kernels.state import derived_from

LOG2E = 1.4426950408889634


def emulated_sm90(q, k, v, lists, votes, slot, tail, *, softmax_scale, threshold, seqused_k):
    """What ``cute_sm90.run_sm90`` does, in PyTorch (fp32), for CPU tensors."""
    count, index = lists[2], lists[3]
    batch, seq_q, heads, dim = q.shape
    seq_k, block_m, block_n = k.shape[1], cute_fwd.tiles_for_head_dim(dim).block_m, cute_fwd.TILE_N
    out, lse = torch.zeros(batch, seq_q, heads, dim), torch.full((batch, heads, seq_q), -math.inf)
    scale_log2 = softmax_scale * LOG2E
    for b, h, qt in itertools.product(range(batch), range(heads), range(count.shape[2])):
        visits = index[b, h, qt, : int(count[b, h, qt])].flip(0).tolist()  # lists are stored last visit first
        rows = torch.arange(qt * block_m, min((qt + 1) * block_m, seq_q))
        if not visits or len(rows) == 0:
            continue
        length = int(seqused_k[b]) if seqused_k is not None else seq_k
        running, total = torch.full((len(rows),), -math.inf), torch.zeros(len(rows))
        acc, best = torch.zeros(len(rows), dim), torch.zeros(len(rows), dtype=torch.long)
        for position, tile in enumerate(visits):
            cols = torch.arange(tile * block_n, min((tile + 1) * block_n, seq_k))
            scores = q[b, rows, h].float() @ k[b, cols, h].float().T
            if position in (0, int(tail[b, h, qt])):  # flash-attn-4 masks the first visit, the kernel the tail's
                scores = scores.masked_fill(cols[None] >= length, -math.inf)
            tile_max, previous = scores.amax(-1), running
            running = torch.maximum(previous, tile_max)
            best = torch.where(tile_max > previous, position, best)
            finite_max = torch.where(running == -math.inf, 0.0, running)
            exps = torch.exp2((scores - finite_max[:, None]) * scale_log2)
            rescale = torch.exp2((previous - finite_max) * scale_log2) if position else torch.ones(len(rows))
            total = total * rescale + exps.sum(-1)
            acc = acc * rescale[:, None] + exps @ v[b, cols, h].float()
            gap = tile_max - previous
            skippable = (gap * scale_log2 <= threshold) & gap.isfinite() & exps.sum(-1).isfinite()
            if threshold > -math.inf and position and not skippable.all():
                bit = 1 << (position % 32)
                votes[b, h, qt, position // 32] |= bit if bit < 2**31 else -(2**31)  # int32 storage
        out[b, rows, h] = acc / total[:, None]
        lse[b, h, rows] = (running + torch.log2(total)) / LOG2E
        if running.max() > -math.inf:  # one candidate per q-tile here, so the score bits need not be ordered
            slot[b, h, qt] = 2**40 + 65535 - int(best[running == running.max()].min())
    return out.to(q.dtype), lse


def local_qkv(batch, seq, heads, dim, seed=0):
    """q/k whose scores peak where positions are close (so tiles get skipped), fp16."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(seq, dtype=torch.float32)[:, None] * torch.logspace(-2.2, -0.5, dim // 2)
    feats = 4 * torch.cat([pos.cos(), pos.sin()], -1)[None, :, None]
    q, k = (feats + 0.3 * torch.randn(batch, seq, heads, dim, generator=gen) for _ in range(2))
    return q.half(), k.half(), torch.randn(batch, seq, heads, dim, generator=gen).half()


def emulated_bound_sm90(q, k, lists, votes, slot, tail, *, softmax_scale, threshold):
    """What ``cute_sm90.bound_sm90`` returns, around :func:`emulated_sm90` (a new LSE whether wanted or not)."""
    return lambda q, k, v, lse_wanted=True: emulated_sm90(q, k, v, lists, votes, slot, tail, softmax_scale=softmax_scale,
                                         threshold=threshold, seqused_k=None)


def check(dim, masked, order, threshold, seq=700, calls=4, own_lists=True, repeat=False) -> bool:
    """``calls`` consecutive calls of both, from one fresh state each; True when every state matches.

    ``own_lists``: the state keeps its own lists where it may (no key mask, small), so that the list kernel runs at
    its first call only (the commit writes the next call's list); else every call uses the shared scratch.
    ``repeat``: calls after the first go through ``cute_repeat``'s function (as lite_attention makes them), which
    must refuse once another writer has written the state."""
    cute_fwd.OWN_LISTS_MAX_BYTES = 1 << 20 if own_lists else 0
    batch, heads = 2, 2
    q, k, v = local_qkv(batch, seq, heads, dim)
    key_valid = torch.arange(seq)[None] < torch.tensor([[seq - 50], [seq - 300]]) if masked else None
    tiles = cute_fwd.tiles_for_head_dim(dim)
    runs, list_launches = [], []
    launch = cute_fwd.launch

    def counted(kernel, *args, **kwargs):
        list_launches.append(kernel is cute_fwd._list_kernel)
        return launch(kernel, *args, **kwargs)

    cute_fwd.launch = counted
    for forward in (cute_fwd.cute_forward, reference_forward):
        state, states = SkipState(), []
        state.initialize((batch, heads, seq, seq), tiles, q.device, ((0, 20),), ())
        again = None
        for call in range(calls):
            arguments = (q, k, v, *state.buffers(), *state.must_masks(q.device), key_valid)
            options = dict(block_m=tiles.block_m, block_n=tiles.block_n, threshold=threshold,
                           softmax_scale=1 / math.sqrt(dim), use_anchor=order == "anchor",
                           descending=order == "alternate" and call % 2 == 0)
            out, _ = again(q, k, v) if again is not None else forward(*arguments, **options)
            if repeat and forward is cute_fwd.cute_forward and again is None:
                again = cute_fwd.cute_repeat(*arguments, **options)
                if again is None:
                    print("cute_repeat did not repeat a call of a state with its own lists")
                    return False
            states.append((out.float(), state.keep.clone(), state.anchor.clone(), int(state.kept)))
        if again is not None:
            state.set_read_words(state.read_words())  # another writer: the repeat must leave the call to the forward
            if again(q, k, v) is not None:
                print("cute_repeat's function ran on lists another writer had written")
                return False
        own = derived_from(state.keep)
        if (own is not None) != (own_lists and not masked and forward is cute_fwd.cute_forward):
            print(f"own lists: {own}")
            return False
        if own is not None and state.nbytes() != sum(t.nbytes for t in state.buffers()) + own.nbytes():
            print(f"state.nbytes() {state.nbytes()} does not count the state's own lists ({own.nbytes()} bytes)")
            return False
        runs.append(states)
    cute_fwd.launch = launch
    expected = 1 if own_lists and not masked else calls  # list kernel launches
    if sum(list_launches) != expected:
        print(f"{sum(list_launches)} list kernel launches in {calls} calls, expected {expected}")
        return False
    ok = all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]
             and float((a[0] - b[0]).abs().max()) < 1e-2 for a, b in zip(*runs))
    print(f"D={dim} mask={masked} {order} threshold={threshold} own lists={own_lists} repeat={repeat} "
          f"kept per call {[s[3] for s in runs[0]]}: {'ok' if ok else 'MISMATCH'}", flush=True)
    return ok


def check_deferred(calls=4) -> bool:
    """Three states whose calls after the first are repeated inside commit windows (as in a patched forward): their
    commits are deferred and go out as batch launches (one per group of options: two thresholds here) when the window
    closes, or when a state is read in the middle. Every state must equal the reference's after every window."""
    from litepatch.kernels import commits

    cute_fwd.OWN_LISTS_MAX_BYTES = 1 << 20
    forms = [(128, 700, -4.0), (128, 700, -4.0), (64, 900, -math.inf)]
    inputs = [local_qkv(2, seq, 2, dim, seed=i) for i, (dim, seq, _) in enumerate(forms)]
    batches, launch = [], cute_fwd.launch

    def counted(kernel, *args, **kwargs):
        batches.append(kernel is cute_fwd._commit_relist_batch_kernel)
        return launch(kernel, *args, **kwargs)

    cute_fwd.launch = counted
    states, twins, repeats = [], [], []
    for (dim, seq, _), (q, _, _) in zip(forms, inputs):
        tiles = cute_fwd.tiles_for_head_dim(dim)
        for group in (states, twins):
            group.append(SkipState())
            group[-1].initialize((2, 2, seq, seq), tiles, q.device, ((0, 20),), ())
    ok = True

    def window(call: int) -> None:
        nonlocal ok
        commits.open_window()
        for i, ((dim, _, threshold), (q, k, v)) in enumerate(zip(forms, inputs)):
            tiles = cute_fwd.tiles_for_head_dim(dim)
            options = dict(block_m=tiles.block_m, block_n=tiles.block_n, threshold=threshold,
                           softmax_scale=1 / math.sqrt(dim), use_anchor=True, descending=False)
            for state, forward in ((states[i], None), (twins[i], reference_forward)):
                arguments = (q, k, v, *state.buffers(), *state.must_masks(q.device), None)
                if forward is not None:
                    forward(*arguments, **options)
                elif call == 0:
                    cute_fwd.cute_forward(*arguments, **options)
                    repeats.append(cute_fwd.cute_repeat(*arguments, **options))
                else:
                    ok &= repeats[i](q, k, v) is not None
            if call == 2 and i == 0:
                states[0].read_words()  # a read while its commit waits: it lands first (one batch of its own)
        if call != calls - 1:
            commits.close_window()

    for call in range(calls):
        if call < calls - 1:
            window(call)
        else:  # deferred in a worker thread whose window is never closed: the reads here launch its commits
            worker = threading.Thread(target=window, args=(call,))
            worker.start(), worker.join()
        for state, twin in zip(states, twins):
            (keep, anchor, kept), (twin_keep, twin_anchor, twin_kept) = state.buffers(), twin.buffers()
            ok &= torch.equal(keep, twin_keep) and torch.equal(anchor, twin_anchor) and int(kept) == int(twin_kept)
    cute_fwd.launch = launch
    # two option groups per window after the first (whose calls commit at once), and the read's batch
    expected = 2 * (calls - 1) + (calls > 2)
    print(f"deferred commits, {calls} windows, {sum(batches)} batch launches (expected {expected}): "
          f"{'ok' if ok and sum(batches) == expected else 'MISMATCH'}", flush=True)
    return ok and sum(batches) == expected


def main() -> int:
    cute_fwd.run_sm90, cute_fwd.bound_sm90 = emulated_sm90, emulated_bound_sm90
    cases = list(itertools.product((64, 128), (False, True), ("anchor", "alternate"), (-4.0, -math.inf)))
    results = [check(*case) for case in cases]
    results += [check(dim, False, order, threshold, own_lists=False)  # the shared scratch without a key mask
                for dim, order, threshold in itertools.product((64, 128), ("anchor", "alternate"), (-4.0,))]
    results.append(check(128, True, "anchor", -3.0, seq=4500, calls=3))  # more than 32 visits: several vote words
    results += [check(dim, False, "anchor", threshold, repeat=True)  # calls as lite_attention repeats them
                for dim, threshold in itertools.product((64, 128), (-4.0, -math.inf))]
    results.append(check_deferred())
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
