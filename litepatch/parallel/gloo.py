"""A CPU harness for the parallel code: :func:`spawn_gloo` runs a function on ``P`` processes joined by
torch.distributed's gloo backend (tests and smoke runs without GPUs).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist


def _spawned(rank: int, world_size: int, init_file: str, result_dir: str, timeout_s: float, fn, args) -> None:
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        # gloo's connectFullMesh can return on one rank before its peer has finished the handshake; a rank that
        # then leaves at once (a cheap fn, or one that raises) closes the pair and fails its peer's init
        dist.barrier()
        torch.set_num_threads(1)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # reported to the parent, which raises
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def spawn_gloo(world_size: int, fn: Callable, *args, timeout_s: float = 120.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` CPU processes joined by a gloo process group.

    ``fn`` must be importable (a module-level function) and its result picklable by ``torch.save``. Ranks are
    forked from a forkserver that has imported torch once (cheap repeated calls). Returns the results by rank; a
    failure on any rank raises ``RuntimeError`` with that rank's traceback; a rank stuck past ``timeout_s`` is
    killed.

    >>> spawn_gloo(2, my_check, 256)      # my_check(rank, world_size, 256) on two ranks
    [result_of_rank_0, result_of_rank_1]
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    # forkserver: one server imports torch once and forks fresh ranks from it (no re-import per rank or per call,
    # and no fork of a process whose OpenMP pool already ran)
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "litepatch.parallel"])
    with tempfile.TemporaryDirectory(prefix="litepatch-gloo-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            context.Process(target=_spawned, args=(r, world_size, init_file, tmp, timeout_s, fn, args), daemon=True)
            for r in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s + 30
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        results, errors = [], []
        for r, proc in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {proc.exitcode} and no result")
                results.append(None)
                continue
            record = torch.load(path, weights_only=False)
            if record["ok"]:
                results.append(record["result"])
            else:
                errors.append(f"rank {r}:\n{record['error']}")
                results.append(None)
        if errors:
            raise RuntimeError("spawn_gloo failed\n" + "\n".join(errors))
    return results
