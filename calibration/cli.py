"""``litepatch calibrate JOB.yaml``: run or continue a calibration job (see :mod:`.job`).

Example:
    $ litepatch calibrate job.yaml                     # run; killed? run it again, it continues
    $ litepatch calibrate job.yaml --worker &          # extra workers on the same storage
    $ litepatch calibrate job.yaml --set trials=40 budget="psnr >= 32"
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file (YAML): entry or pipeline, samples, held_out, budget, trials, ...")
    parser.add_argument("--trials", type=int, help="total finished trials wanted (overrides the job)")
    parser.add_argument("--output", help="output folder (overrides the job)")
    parser.add_argument("--storage", help="Optuna storage URL or file (default: sqlite in the output folder)")
    parser.add_argument("--study-name", help="study name (overrides the job)")
    parser.add_argument("--worker", action="store_true",
                        help="only run trials (no held-out check, no outputs): extra workers on shared storage")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="OmegaConf overrides, e.g. budget='psnr >= 32' search.max_dense_layers=2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .job import load_job, run_job

    overrides = list(args.set)
    for key, value in (("trials", args.trials), ("output", args.output), ("storage", args.storage),
                       ("study_name", args.study_name)):
        if value is not None:
            overrides.append(f"{key}={value}")
    job = load_job(args.job, overrides)
    run_job(job, worker=args.worker, progress=not args.no_progress)
    return 0
