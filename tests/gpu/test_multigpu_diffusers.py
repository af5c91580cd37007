"""litepatch inside diffusers' context parallelism on 2 GPUs (NCCL, bfloat16, Triton kernel): the GPU twin of
tests/unit/test_parallel_diffusers.py and tests/unit/test_parallel_diffusers_ring.py. A tiny random-weight
WanTransformer3DModel with the native backend, patched on each rank, over 3 calls that skip:

* ``ContextParallelConfig(ulysses_degree=2)`` against the same model patched in one process on cuda:0: outputs close
  and each rank's read lists equal to the single-process lists of its heads;
* ``ContextParallelConfig(ring_degree=2)`` against the single-GPU *chunked* run (each self-attention call through
  ``chunked_lite_attention`` with 2 chunks on cuda:0): outputs close and each rank's list per (query shard, K/V chunk)
  equal to the chunked run's list of that shard and chunk.

Ranks are started by ``torch.multiprocessing.spawn``; both configurations run in one spawn."""

from __future__ import annotations

import itertools
import os
import tempfile
import traceback
from unittest import mock

import pytest
import torch

import tiny_models as tm

pytestmark = pytest.mark.gpu

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA GPUs (torch.cuda.device_count() < 2)", allow_module_level=True)

diffusers = pytest.importorskip("diffusers")
litepatch = pytest.importorskip("litepatch")
pytest.importorskip("litepatch.kernels.triton_fwd")

WORLD = 2
HEADS = 4
TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)
LATENT_SHAPE = (1, 16, 5, 48, 48)  # 5 x 24 x 24 = 2880 tokens, 1440 per rank
TIMESTEPS = (999.0, 900.0, 800.0)
THRESHOLD = -4.0
SHARPNESS = 4.0
# bfloat16 projections of a sequence shard and of the whole sequence may round differently (other GEMM tilings),
# so a tile whose score sits at the threshold may flip: allow a few such tiles, and report how many
MAX_READ_MISMATCH = 0.01
MAX_REL_ERROR = 2e-2


def tiny_wan(device):
    """Same weights and inputs in every process; q/k tied and sharpened so the threshold skips (see the CPU test)."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY_WAN).eval()
    tm.sharpen_wan_self_attention(model, SHARPNESS)
    latents = torch.randn(LATENT_SHAPE)
    text = torch.randn(1, 16, TINY_WAN["text_dim"])
    model = model.to(device, torch.bfloat16)
    return model, latents.to(device, torch.bfloat16), text.to(device, torch.bfloat16)


@torch.inference_mode()
def patched_calls(model, latents, text):
    handle = litepatch.apply(model, threshold=THRESHOLD, warmup_steps=0)
    outs, reads = [], []
    for t in TIMESTEPS:
        timestep = torch.full((1,), t, device=latents.device)
        out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        outs.append(out.float().cpu())
        reads.append({
            name: {branch: state.read_list().cpu() for branch, state in branches.items()}
            for name, branches in handle.skip_states().items()
        })
    states = [s for branches in handle.skip_states().values() for s in branches.values()]
    result = {
        "outs": outs,
        "reads": reads,
        "kept_fraction": handle.stats().kept_fraction(),
        "dense_records": [r for r in handle.stats().records if r["dense"]],
        "tiles": [s.tiles for s in states],
    }
    handle.remove()
    return result


def _rank(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    path = os.path.join(tmp, f"rank{rank}.pt")
    try:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group(
            "nccl", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank, world_size=world, device_id=device
        )
        try:
            result = {}
            for mode in ("ulysses", "ring"):
                model, latents, text = tiny_wan(device)
                model.enable_parallelism(config=diffusers.ContextParallelConfig(**{f"{mode}_degree": world}))
                result[mode] = patched_calls(model, latents, text)
                torch.cuda.synchronize(device)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="litepatch-nccl-") as tmp:
        try:
            mp.spawn(_rank, args=(WORLD, tmp), nprocs=WORLD, join=True)
        except Exception as err:
            errors = []
            for r in range(WORLD):
                path = os.path.join(tmp, f"rank{r}.pt")
                if os.path.exists(path):
                    record = torch.load(path, weights_only=False)
                    if not record["ok"]:
                        errors.append(f"rank {r}:\n{record['error']}")
            raise RuntimeError("2-GPU run failed\n" + "\n".join(errors)) from err
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)["result"] for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    model, latents, text = tiny_wan(torch.device("cuda", 0))
    return patched_calls(model, latents, text)


@pytest.fixture(scope="module")
def chunked_process():
    """The ring's target on cuda:0: each self-attention call through ``chunked_lite_attention`` (2 chunks, one state
    per (layer, query shard, K/V chunk)); reads ``[{(shard, chunk): read}]`` per call and layer."""
    from diffusers.models.transformers import transformer_wan

    from litepatch.parallel import ChunkedSkipState, chunked_lite_attention

    model, latents, text = tiny_wan(torch.device("cuda", 0))
    layers = TINY_WAN["num_layers"]
    states = [ChunkedSkipState() for _ in range(layers)]
    self_calls = itertools.count()
    original = transformer_wan.dispatch_attention_fn

    def dispatch(query, key, value, *args, **kwargs):
        if query.shape[1] != key.shape[1]:  # cross-attention: text keys
            return original(query, key, value, *args, **kwargs)
        return chunked_lite_attention(query, key, value, states[next(self_calls) % layers], n_chunks=WORLD,
                                      threshold=THRESHOLD)

    outs, reads = [], []
    with torch.inference_mode(), mock.patch.object(transformer_wan, "dispatch_attention_fn", dispatch):
        for t in TIMESTEPS:
            timestep = torch.full((1,), t, device=latents.device)
            out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
            outs.append(out.float().cpu())
            reads.append([{key: s.read_list().cpu() for key, s in layer.items()} for layer in states])
    tiles = {s.tiles for layer in states for s in layer.values()}
    return {"outs": outs, "reads": reads, "tiles": tiles}


def test_ulysses_on_two_gpus_equals_the_single_gpu_run(ranks, single_process):
    from litepatch.kernels import triton_fwd

    want = single_process
    assert want["kept_fraction"] < 1.0, "the case must skip tiles"
    assert want["dense_records"] == []
    assert all(tiles == triton_fwd.tiles_for_head_dim(64) for tiles in want["tiles"]), "the Triton kernel must run"
    local = HEADS // WORLD
    for rank, got in enumerate(r["ulysses"] for r in ranks):
        assert got["dense_records"] == [], f"rank {rank} fell back to dense"
        assert got["kept_fraction"] < 1.0
        assert all(tiles == triton_fwd.tiles_for_head_dim(64) for tiles in got["tiles"])
        for call in range(len(TIMESTEPS)):
            out, ref = got["outs"][call], want["outs"][call]
            rel = float((out - ref).norm() / ref.norm())
            assert rel < MAX_REL_ERROR, f"rank {rank} call {call}: relative error {rel:.3e}"
            assert got["reads"][call].keys() == want["reads"][call].keys()
            for name, branches in want["reads"][call].items():
                for branch, read in branches.items():
                    mine = got["reads"][call][name][branch]
                    heads = read[:, rank * local : (rank + 1) * local]
                    assert mine.shape == heads.shape, (name, branch)
                    mismatch = float((mine != heads).float().mean())
                    assert mismatch <= MAX_READ_MISMATCH, (
                        f"rank {rank} call {call} {name}/{branch}: {mismatch:.2%} of read-list tiles differ"
                    )


def test_ring_on_two_gpus_equals_the_single_gpu_chunked_run(ranks, chunked_process):
    from litepatch.kernels import triton_fwd
    from litepatch.parallel import ChunkKey

    want = chunked_process
    assert want["tiles"] == {triton_fwd.tiles_for_head_dim(64)}, "the Triton kernel must run"
    assert any(not read.all() for layer in want["reads"][-1] for read in layer.values()), "the case must skip"
    for rank, got in enumerate(r["ring"] for r in ranks):
        assert got["dense_records"] == [], f"rank {rank} fell back to dense"
        assert got["kept_fraction"] < 1.0
        assert all(tiles == triton_fwd.tiles_for_head_dim(64) for tiles in got["tiles"])
        for call in range(len(TIMESTEPS)):
            out, ref = got["outs"][call], want["outs"][call]
            rel = float((out - ref).norm() / ref.norm())
            assert rel < MAX_REL_ERROR, f"ring rank {rank} call {call}: relative error {rel:.3e}"
            for layer, chunks in enumerate(want["reads"][call]):
                name = f"blocks.{layer}.attn1"
                mine = got["reads"][call][name]
                assert sorted(mine) == [ChunkKey(0, rank, c) for c in range(WORLD)], (name, sorted(mine))
                for (_, shard, chunk), read in mine.items():
                    ref_read = chunks[shard, chunk]
                    assert read.shape == ref_read.shape, (name, shard, chunk)
                    mismatch = float((read != ref_read).float().mean())
                    assert mismatch <= MAX_READ_MISMATCH, (
                        f"ring rank {rank} call {call} {name} chunk {chunk}: {mismatch:.2%} of read-list tiles differ"
                    )
