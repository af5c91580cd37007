"""Skip state shared by every LiteAttention backend (the PyTorch reference and the Triton kernel).

Layout (one :class:`SkipState` per attention layer x CFG branch; batch rows and heads inside it):

* ``keep``: ``int32[B, H, q_tiles, n_words]``, ``n_words = ceil(k_tiles / 32)``. Bit ``j % 32`` of
  word ``j // 32`` is set when key tile ``j`` is in the *read list* of that (batch row, head,
  q-tile): the next call computes it. Bits at or beyond ``k_tiles`` are always zero. A call reads
  the row and rewrites it in place (read list minus the tiles it found skippable); a program owns
  its own row, so no double buffer is needed.
* ``anchor``: ``int32[B, H, q_tiles]``: the key tile that held the q-tile's largest score in the
  previous call. The next call visits it first, then the other read tiles in ascending order.
* ``kept``: ``int64[]`` (0-dim, on the device): tiles computed by the last call, summed over all
  batch rows, heads and q-tiles. Read lazily (no host sync per call).

Memory at Wan2.1-14B 720p (B1, H40, S=75,600) with 128x64 tiles: 591 q-tiles x 37 words x 40 heads
x 4 B = 3.34 MiB of ``keep`` plus 94 KiB of ``anchor`` per layer per branch (1.7 MiB with 128x128).

Must-compute ranges (token ranges that are never skipped) are fixed when the state is created:
a tile dropped earlier could not come back, so changing them re-initialises the state.

Example:
    >>> state = SkipState()
    >>> out = lite_attention(q, k, v, state, threshold=-6.0)   # first call: every tile
    >>> out = lite_attention(q, k, v, state, threshold=-6.0)   # reads the list the first call wrote
    >>> state.kept_fraction()
    0.41
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .vocabulary import ORDERS  # noqa: F401  (re-exported as litepatch.kernels.ORDERS)

TokenRanges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes that fix the state layout: ``block_m`` query rows by ``block_n`` key rows.

    ``block_m`` is a multiple of 16 (a GPU kernel may take 192 query rows, three warpgroups of 64); ``block_n`` is
    a power of two >= 16.
    """

    block_m: int = 128
    block_n: int = 64

    def __post_init__(self):
        if self.block_m < 16 or self.block_m % 16:
            raise ValueError(f"block_m must be a multiple of 16, >= 16, got {self.block_m}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")


DEFAULT_TILES = TileConfig()


def normalize_ranges(ranges: Sequence[Sequence[int]] | None, length: int, what: str) -> TokenRanges:
    """Validates ``[(start, end), ...]`` token ranges (end exclusive) against a sequence length."""
    if not ranges:
        return ()
    out = []
    for item in ranges:
        if len(item) != 2:
            raise ValueError(f"{what} must be (start, end) pairs, got {item!r}")
        start, end = int(item[0]), int(item[1])
        if not 0 <= start < end <= length:
            raise ValueError(f"{what} range ({start}, {end}) is outside [0, {length}) or empty")
        out.append((start, end))
    return tuple(sorted(out))


def tiles_touched(ranges: TokenRanges, block: int, n_tiles: int, device=None) -> torch.Tensor:
    """Bool ``[n_tiles]`` on ``device``: tiles holding at least one token of the ranges.

    Made where it is used (a fill per range): a host-to-device copy would synchronise the device, at the first
    call of every layer and branch of a generation.
    """
    touched = torch.zeros(n_tiles, dtype=torch.bool, device=device)
    for start, end in ranges:
        touched[start // block : (end - 1) // block + 1] = True
    return touched


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., n]`` -> int32 ``[..., ceil(n / 32)]`` with bit ``j % 32`` of word ``j // 32``."""
    n = mask.shape[-1]
    n_words = max(1, math.ceil(n / 32))
    padded = torch.zeros(*mask.shape[:-1], n_words * 32, dtype=torch.int64, device=mask.device)
    padded[..., :n] = mask.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    words = (padded.view(*mask.shape[:-1], n_words, 32) * weights).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement into int32


def all_tiles_words(n: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """int32 ``[*shape, ceil(n / 32)]``: every one of ``n`` tiles listed (:func:`pack_bits` of all-True), in two
    kernels: a state's first call makes these for every layer and branch."""
    words = torch.full((*shape, max(1, math.ceil(n / 32))), -1, dtype=torch.int32, device=device)
    if n % 32:
        words[..., -1] = (1 << (n % 32)) - 1
    return words


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 ``[..., n_words]`` -> bool ``[..., n]``."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :n].bool()


DERIVED_ATTR = "_litepatch_derived"  # what a backend derived from a state's keep/anchor, kept on the keep tensor


def derived_from(keep: torch.Tensor):
    """What a backend stored on ``keep`` (:func:`remember_derived`), else ``None``."""
    return keep.__dict__.get(DERIVED_ATTR)


def remember_derived(keep: torch.Tensor, value) -> None:
    """Stores ``value`` on ``keep`` (a new or cloned state does not carry it). ``value.invalidate()`` is called
    whenever another writer writes the state (:func:`keep_written`), and the backend then derives it again;
    ``value.nbytes()`` counts in the state's :meth:`SkipState.nbytes`; while ``value.pending`` (optional) is true,
    ``value.settle()`` is called before the state is read or written (:func:`settle`)."""
    keep.__dict__[DERIVED_ATTR] = value


def keep_written(keep: torch.Tensor) -> None:
    """Marks what was derived from ``keep`` out of date: every writer of a state's keep or anchor that is not the
    backend which derived it calls this (the reference and Triton backends, :meth:`SkipState.set_read_words`)."""
    derived = derived_from(keep)
    if derived is not None:
        derived.invalidate()


def settle(keep: torch.Tensor | None) -> None:
    """Launches the state's deferred commit, if its backend deferred one (:mod:`litepatch.kernels.commits`), before
    anything reads or writes the state: what the backend derived from ``keep`` has ``settle()`` then."""
    derived = derived_from(keep) if keep is not None else None
    if derived is not None and getattr(derived, "pending", False):
        derived.settle()


class SkipBuffers(NamedTuple):
    """The device tensors a backend reads and rewrites in place (layout in the module docstring)."""

    keep: torch.Tensor
    anchor: torch.Tensor
    kept: torch.Tensor


@dataclass
class SkipState:
    """Skip lists of one attention layer for one CFG branch (all batch rows and heads).

    Created empty; the first call sizes it from the shapes it sees and computes every tile. A call
    with other shapes, tiles or must-compute ranges re-initialises it (that call is dense again).

    The state owns its lifecycle: create (``SkipState()``), size (:meth:`prepare`, :meth:`initialize`),
    reset (:meth:`reset`), count calls (:meth:`count_call`, :meth:`fold_calls`, :meth:`descending`), read
    (:meth:`read_list`, :meth:`kept_tiles`, :meth:`kept_count`), force a read list (:meth:`set_read_list`,
    :meth:`set_read_words`, :meth:`read_words`) and move heads (:meth:`with_heads`). Code outside
    ``litepatch.kernels`` uses these and never its fields.
    """

    keep: torch.Tensor | None = None
    anchor: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    tiles: TileConfig = DEFAULT_TILES
    shape: tuple[int, int, int, int] | None = None  # (B, H, seq_q, seq_k)
    must_compute_queries: TokenRanges = ()
    must_compute_keys: TokenRanges = ()
    calls: int = 0
    _must_masks: dict = field(default_factory=dict, repr=False)
    # the last call, as its backend can repeat it with less host time (``Backend.repeat``; kept by lite_attention,
    # and only for the ``keep`` tensor it was made with: a state sized again, or copied out of inference mode, has new
    # buffers; reset drops it with the buffers it holds)
    repeat: object = field(default=None, repr=False, compare=False)

    @property
    def initialized(self) -> bool:
        return self.keep is not None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the repeated call out: it writes this state's buffers, not the copy's (and holds
        functions that do not pickle)."""
        fields = dict(self.__dict__)
        fields["repeat"] = None
        return fields

    @property
    def batch(self) -> int:
        """Batch rows the state holds lists for."""
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the lists live."""
        return self.buffers().keep.device

    @property
    def heads(self) -> int:
        """Heads the state holds lists for (a rank's share under Ulysses)."""
        return self.shape[1]

    @property
    def q_tiles(self) -> int:
        return -(-self.shape[2] // self.tiles.block_m)

    @property
    def k_tiles(self) -> int:
        return -(-self.shape[3] // self.tiles.block_n)

    def total_tiles(self) -> int:
        """``B * H * q_tiles * k_tiles``, in one frame: every sparse call's stats record asks for it."""
        batch, heads, seq_q, seq_k = self.shape
        tiles = self.tiles
        return batch * heads * -(-seq_q // tiles.block_m) * -(-seq_k // tiles.block_n)

    def reset(self) -> None:
        """Forgets every skip decision: the next call computes all tiles again."""
        self.keep = self.anchor = self.kept = None
        self.shape = None
        self.calls = 0
        self.repeat = None

    def matches(self, shape, tiles: TileConfig, device, must_q: TokenRanges, must_k: TokenRanges) -> bool:
        return (
            self.initialized
            and self.shape == tuple(shape)
            and self.tiles == tiles
            and self.keep.device == device
            and self.must_compute_queries == must_q
            and self.must_compute_keys == must_k
        )

    def initialize(self, shape, tiles: TileConfig, device, must_q: TokenRanges, must_k: TokenRanges) -> None:
        """Sizes the state for ``shape = (B, H, seq_q, seq_k)``; every tile is in the read list."""
        self.shape = tuple(int(s) for s in shape)
        self.tiles = tiles
        self.must_compute_queries, self.must_compute_keys = must_q, must_k
        self._must_masks = {}
        batch, heads, seq_q, seq_k = self.shape
        self.keep = all_tiles_words(self.k_tiles, (batch, heads, self.q_tiles), device)
        self.anchor = initial_anchor(seq_q, seq_k, tiles, device).expand(batch, heads, -1).contiguous()
        self.kept = torch.zeros((), dtype=torch.int64, device=device)
        self.calls = 0

    def prepare(self, shape, tiles: TileConfig, device, must_q: TokenRanges, must_k: TokenRanges) -> None:
        """Readies the state for a call of ``shape``: kept as it is when it matches, else (re)initialised."""
        if not self.matches(shape, tiles, device, must_q, must_k):
            self.initialize(shape, tiles, device, must_q, must_k)

    def buffers(self) -> SkipBuffers:
        """``(keep, anchor, kept)``: what a backend's forward takes (benchmarks call backends with them)."""
        if not self.initialized:
            raise ValueError("the state has no buffers yet: initialize it or run one call first")
        settle(self.keep)
        return SkipBuffers(self.keep, self.anchor, self.kept)

    # ------------------------------------------------------------------------------------------- calls
    def count_call(self) -> None:
        """Records that a call read (and maybe rewrote) the lists."""
        self.calls += 1

    def descending(self, order: str) -> bool:
        """Whether the coming call visits key tiles from last to first (``"alternate"``: every other call)."""
        return order == "alternate" and self.calls % 2 == 0

    def fold_calls(self, order: str) -> None:
        """Keeps only what the call count decides (first call or not; the parity for ``"alternate"``), so that
        ``torch.compile``, which specialises on the count, does not recompile on every call."""
        if self.calls > 1:
            self.calls = 1 if order != "alternate" else 2 + self.calls % 2

    def usable_outside_inference_mode(self) -> None:
        """Tensors made under ``torch.inference_mode`` cannot be updated in place outside it: copies them then."""
        keep = self.keep  # not self.initialized: a property's frame, and this runs for every layer on every forward
        if keep is not None and keep.is_inference() and not torch.is_inference_mode_enabled():
            settle(keep)
            self.keep, self.anchor, self.kept = self.keep.clone(), self.anchor.clone(), self.kept.clone()

    # ------------------------------------------------------------------------------------------ counts
    def kept_tiles(self) -> int:
        """Tiles the last call computed (0 before any call). Synchronises the device."""
        settle(self.keep)
        return int(self.kept) if self.initialized and self.calls > 0 else 0

    def kept_count(self) -> torch.Tensor:
        """A copy of the last call's kept-tile count, a 0-dim device tensor (read later, without a sync now)."""
        settle(self.keep)
        return self.kept.clone()

    # -------------------------------------------------------------------------------- forcing the lists
    def read_words(self) -> torch.Tensor:
        """A copy of the packed read lists (int32 ``[B, H, q_tiles, n_words]``), for :meth:`set_read_words`."""
        return self.buffers().keep.clone()

    def set_read_words(self, words: torch.Tensor) -> None:
        """Overwrites the read lists in place with packed words that broadcast to ``[B, H, q_tiles, n_words]``."""
        keep_written(self.buffers().keep)
        self.keep.copy_(words.to(self.keep.device).expand_as(self.keep))

    def set_read_list(self, mask: torch.Tensor) -> None:
        """Overwrites the read lists in place: bool ``[..., q_tiles, k_tiles]`` broadcast to every batch row and
        head (True: the next call computes that tile)."""
        self.set_read_words(pack_bits(mask.to(self.buffers().keep.device)))

    def with_heads(self, regroup: Callable[[torch.Tensor], torch.Tensor]) -> SkipState:
        """A new state whose lists are ``regroup(t)`` of this one's (``t`` is ``[B, H, ...]``; ``regroup`` picks,
        reorders or gathers heads along dim 1). Its ``kept`` is the tiles its read lists hold (the next call's
        work): the last call's count is not recorded per head.
        """
        if not self.initialized:
            raise ValueError("the state has not been used yet; it has no heads to move")
        settle(self.keep)
        keep, anchor = regroup(self.keep), regroup(self.anchor)
        shape = (self.shape[0], keep.shape[1], *self.shape[2:])
        moved = SkipState(keep=keep, anchor=anchor, tiles=self.tiles, shape=shape,
                          must_compute_queries=self.must_compute_queries, must_compute_keys=self.must_compute_keys,
                          calls=self.calls)
        moved.kept = moved.read_list().sum().to(torch.int64).to(self.kept.device)
        return moved

    def must_masks(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool ``[q_tiles]``, bool ``[k_tiles]``): tiles that may never be marked skippable."""
        if device not in self._must_masks:
            self._must_masks[device] = (
                tiles_touched(self.must_compute_queries, self.tiles.block_m, self.q_tiles, device),
                tiles_touched(self.must_compute_keys, self.tiles.block_n, self.k_tiles, device))
        return self._must_masks[device]

    def read_list(self) -> torch.Tensor:
        """Bool ``[B, H, q_tiles, k_tiles]``: the tiles the next call computes."""
        settle(self.keep)
        return unpack_bits(self.keep, self.k_tiles)

    def kept_fraction(self) -> float:
        """Fraction of tiles the last call computed (1.0 before any call). Synchronises the device."""
        if not self.initialized or self.calls == 0:
            return 1.0
        settle(self.keep)
        return float(self.kept) / self.total_tiles()

    def nbytes(self) -> int:
        """Bytes of skip state held on the device (with what a backend derived from it, such as its own lists)."""
        held = sum(t.numel() * t.element_size() for t in (self.keep, self.anchor, self.kept) if t is not None)
        derived = derived_from(self.keep) if self.keep is not None else None
        return held + (derived.nbytes() if derived is not None else 0)


def initial_anchor(seq_q: int, seq_k: int, tiles: TileConfig, device) -> torch.Tensor:
    """int32 ``[q_tiles]``: the diagonal key tile when ``seq_q == seq_k``, else tile 0."""
    q_tiles = math.ceil(seq_q / tiles.block_m)
    if seq_q != seq_k:
        return torch.zeros(q_tiles, dtype=torch.int32, device=device)
    k_tiles = math.ceil(seq_k / tiles.block_n)
    block_m = tiles.block_m
    centre = torch.arange(block_m // 2, q_tiles * block_m, block_m, dtype=torch.int32, device=device)  # q_tiles
    return centre.clamp_(max=seq_q - 1).div_(tiles.block_n, rounding_mode="floor").clamp_(max=k_tiles - 1)
