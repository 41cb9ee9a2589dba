"""Peak memory of a sweep against its number of samples: is it bounded by the batch size?

    python -m bench.memory                                          # 1,000 / 10,000 / 50,000 samples
    python -m bench.memory --samples 1000,10000 --out runs/memory.md

Each count runs ``python -m bench.run`` in a process of its own — one cell (DDIM, 1 step), FD in ResNet-20
features — on :data:`IMAGE_CARD` (:func:`image_card`), an exact 3×64×64 image model that costs next to nothing to sample, so that
what is measured is the harness (samples, features, metrics) and not a network.  The process's peak resident
set size (``ru_maxrss``) is read when it ends.  A harness whose memory is bounded by the batch size shows the
same peak at every count; one that keeps a cell's samples grows by their size (3·64·64·4 bytes per sample in
float32, and more for each copy).

The reference is a statistics file the study writes (mean 0, identity covariance, the width of ResNet-20's
features): the FD values mean nothing, only the memory does.  Needs the ResNet-20 weights of the offline
assets (``resnet20_cifar/``).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pretrained.analytic import GaussianMixture
from pretrained.cards import ModelCard
from solvers import schedules

from bench.provenance import cpu_name, git_commit
from bench.results import atomic_write_text

SHAPE = (3, 64, 64)
FEATURE_WIDTH = 64  # ResNet-20's pooled features (bench.features)
# the child process: the harness's own entry point, then its peak resident set size (kB on Linux)
CHILD = ("import resource, sys\nfrom bench.run import main\nstatus = main(sys.argv[1:])\n"
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
         "sys.exit(status)\n")


def image_card() -> ModelCard:
    """An exact 3×64×64 'image model' (a two-component Gaussian mixture in [−1, 1]): sampling costs next to
    nothing, so a sweep's memory is the harness's."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(2, int(np.prod(SHAPE)), generator=g, dtype=torch.float64) * 1.6 - 0.8
    mixture, schedule = GaussianMixture(means, 0.2), schedules.VPLinear()
    return ModelCard(name="memory_image", kind="image", description="exact 3×64×64 mixture (memory study)",
                     loader=lambda device="cpu", **kw: mixture.as_model(schedule, "eps"), sample_shape=SHAPE,
                     prediction="eps", schedule_name="VPLinear", reference="none",
                     to_images=lambda x: ((x + 1) / 2).clamp(0, 1), default_num_samples=1000,
                     default_batch_size=500)


IMAGE_CARD = image_card()


def peak_rss(samples: int, batch_size: int, threads: int, work: Path) -> dict:
    """Run one sweep of ``samples`` samples in a new process; its peak RSS (MB), wall-clock and exit status."""
    stats = work / "reference.npz"
    if not stats.exists():
        np.savez(stats, mu=np.zeros(FEATURE_WIDTH), sigma=np.eye(FEATURE_WIDTH))
    argv = ["--model", f"{__name__}:IMAGE_CARD", "--solvers", "ddim", "--steps", "1", "--metric", "fd_resnet20",
            "--reference", str(stats), "--num-samples", str(samples), "--batch-size", str(batch_size),
            "--threads", str(threads), "--repeats", "1", "--quiet", "--no-report",
            "--out", str(work / f"run_{samples}"), "--cache-dir", str(work / "cache")]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    peak = [line.split()[1] for line in lines if line.startswith("PEAK_RSS_KB")]
    if proc.returncode != 0 or not peak:
        said = [line for line in lines if not line.startswith("PEAK_RSS_KB")][-1:] or ["no output"]
        raise RuntimeError(f"bench.run with {samples} samples failed (status {proc.returncode}): {said[0]}")
    return {"samples": samples, "peak_mb": int(peak[0]) / 1024, "seconds": seconds}


def report(rows: list[dict], batch_size: int, threads: int, command: str) -> str:
    """The Markdown page: the command, the machine, and peak RSS per sample count."""
    per_sample = 4 * int(np.prod(SHAPE)) / 2 ** 20
    commit, dirty = git_commit()
    lines = ["# Peak memory of a sweep against its number of samples", "",
             f"Command: `{command}`  ", f"Machine: {cpu_name()} ({platform.machine()}, {os.cpu_count()} cores), "
             f"--threads {threads} in each run; {datetime.now(timezone.utc):%Y-%m-%d}, commit "
             f"{(commit or 'unknown')[:10]}{' with uncommitted changes' if dirty else ''}", "",
             f"One cell (DDIM, 1 step, FD in ResNet-20 features) of `bench.studies.memory:IMAGE_CARD` "
             f"({'×'.join(map(str, SHAPE))}), batch size {batch_size}; each count in a process of its own, "
             f"its peak resident set size read when it ends. One float32 copy of a sample is "
             f"{per_sample:.3f} MB.", "",
             "| samples | peak RSS (MB) | growth over the first count (MB) | wall-clock (s) |",
             "|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['samples']:,} | {row['peak_mb']:.0f} | {row['peak_mb'] - rows[0]['peak_mb']:+.0f} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="1000,10000,50000", help="comma-separated sample counts")
    p.add_argument("--batch-size", type=int, default=500, help="samples per batch (default 500)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each run (default 2)")
    p.add_argument("--out", default="runs/memory.md", help="the Markdown report (default runs/memory.md)")
    args = p.parse_args(argv)
    try:
        counts = [int(s) for s in args.samples.split(",")]
    except ValueError:
        p.error(f"--samples takes comma-separated integers, got {args.samples!r}")
    if any(c < 2 for c in counts) or args.batch_size < 1:
        p.error("each sample count must be at least 2 (FD needs two samples) and --batch-size positive")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n in counts:
            rows.append(peak_rss(n, args.batch_size, args.threads, Path(work)))
            print(f"bench.memory: {n:,} samples: peak RSS {rows[-1]['peak_mb']:.0f} MB", file=sys.stderr)
    command = "python -m bench.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_text(Path(args.out), report(rows, args.batch_size, args.threads, command.strip()))
    print(f"bench.memory: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
