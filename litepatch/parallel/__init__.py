"""LiteAttention under context (sequence) parallelism: Ulysses, ring, load balance, and a CPU emulator.

Every rank holds one shard of the sequence, ``[B, S/P, H, D]`` (``P`` ranks in ``group``). Two ways to attend:

* **Ulysses** (:func:`ulysses_lite_attention`): one all-to-all turns the sequence shards into head shards
  ``[B, S, H/P, D]``, each rank runs :func:`~litepatch.kernels.lite_attention` over the *full* sequence for its
  ``H/P`` heads with a rank-local :class:`~litepatch.kernels.SkipState` (it holds only those heads), and a second
  all-to-all brings the output back to ``[B, S/P, H, D]``. Attention per head is exactly the single-process one,
  so read/write lists per head equal the single-process run's (the state's heads slice).
* **Ring** (:func:`ring_lite_attention`): each rank keeps its query shard ``i``; the K/V chunks rotate around the
  ring. Every (query shard ``i``, K/V chunk ``c``) pair has its own :class:`SkipState` (``c`` is the index of the K/V
  shard, not the rotation step), each call returns its LSE and the partial outputs are merged by LSE
  (:func:`merge_partials`).

Ring semantics differ from unchunked attention. The skip test compares a tile against the running row max
*within its own call*, so in a ring every chunk restarts the running max: a tile is tested only against the keys
of its own chunk visited before it, the first tile visited in each chunk is never skippable (so every q-tile keeps
at least one tile per chunk), and the tiles follow the chunk's own tiling (when ``S/P`` is not a multiple of the
key tile the chunk tiles do not line up with the global ones). The equality target of a ring is therefore the
single-process *chunked* run :func:`chunked_lite_attention`, which calls ``lite_attention`` once per (query shard,
K/V chunk) and merges by LSE: same lists, outputs within float tolerance. With ``threshold=-inf`` nothing is
skipped and both equal dense attention. Must-compute token ranges are given in global coordinates and shifted into
each call's local coordinates (:func:`shard_ranges`).

**Ulysses x ring** (:func:`ulysses_ring_lite_attention`, groups from :func:`ulysses_ring_groups`): Ulysses inside
each ring shard, a ring across them, for more ranks than heads allow for Ulysses alone (or to keep the all-to-alls
inside a node). Its lists equal the chunked run's with ``n_chunks = ring_degree``, heads sliced per Ulysses rank.

Load balance: :func:`kept_tiles` and :func:`load_report` give each rank's kept work and the imbalance (max/mean);
:func:`head_work` and :func:`place_heads` assign heads to Ulysses ranks by kept work (greedy longest-processing-time
with ``H/P`` heads per rank); :func:`reshard_ulysses_state` moves the skip lists when the placement changes. Whether
the balance pays in step time can only be measured on GPUs (``benchmarks/multigpu.py``).

:func:`spawn_gloo` runs a function on ``P`` CPU processes joined by torch.distributed's gloo backend (tests and
smoke runs without GPUs).

The package, file by file: ``shards`` (ranks, token ranges shifted into a shard, the LSE merge), ``ulysses``,
``ring`` (with the chunked single-process target and the dense op with LSE), ``ulysses_ring`` (the mixes),
``balance`` (kept work, imbalance, head placement, resharding) and ``gloo`` (the CPU harness).

Example:
    >>> import torch.distributed as dist
    >>> from litepatch.kernels import SkipState
    >>> from litepatch.parallel import ulysses_lite_attention
    >>> state = SkipState()                      # this rank's heads only
    >>> out = ulysses_lite_attention(q_shard, k_shard, v_shard, state, threshold=-6.0)   # [B, S/P, H, D]
"""

from __future__ import annotations

from litepatch.parallel.shards import merge_partials, shard_ranges
from litepatch.parallel.ulysses import contiguous_head_order, ulysses_attention, ulysses_lite_attention
from litepatch.parallel.ring import (
    ChunkedSkipState, ChunkKey, chunked_lite_attention, ring_attention, ring_lite_attention, sdpa_with_lse,
)
from litepatch.parallel.ulysses_ring import UlyssesRingGroups, ulysses_ring_groups, ulysses_ring_lite_attention
from litepatch.parallel.balance import (
    LoadReport, gather_head_work, head_work, imbalance_ratio, kept_tiles, load_report, place_heads,
    reshard_ulysses_state,
)
from litepatch.parallel.gloo import spawn_gloo

__all__ = [
    "ChunkKey",
    "ChunkedSkipState",
    "LoadReport",
    "UlyssesRingGroups",
    "chunked_lite_attention",
    "contiguous_head_order",
    "gather_head_work",
    "head_work",
    "imbalance_ratio",
    "kept_tiles",
    "load_report",
    "merge_partials",
    "place_heads",
    "reshard_ulysses_state",
    "ring_attention",
    "ring_lite_attention",
    "sdpa_with_lse",
    "shard_ranges",
    "spawn_gloo",
    "ulysses_attention",
    "ulysses_lite_attention",
    "ulysses_ring_groups",
    "ulysses_ring_lite_attention",
]
