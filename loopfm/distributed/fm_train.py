"""Data-parallel FM stream training: `train_fm` on every torchrun rank, gloo on CPU.

    torchrun --standalone --nproc-per-node 2 -m loopfm.distributed.fm_train --run-dir R

(`loopfm fm train --nproc 2` runs exactly that.) On several machines use torchrun's
--nnodes/--rdzv-endpoint; every rank must see the run directory (a shared file system).
Rank 0 writes the checkpoints in the single-process format, so `loopfm fm log` and every
later stage are unchanged. Rank 0 also writes fm/distributed.json with every rank's final
parameter digest next to the last checkpoint's, so a run shows its replicas never diverged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loopfm.core.config import RunConfig
from loopfm.core.files import write_text
from loopfm.core.rundir import RunPaths
from loopfm.fm.train import checkpoint_path, parameter_digest, train_fm


def launch(run_dir: Path, nproc: int) -> None:
    """Run this module under torchrun with `nproc` local processes; raise if any rank fails."""
    if nproc < 2:
        raise ValueError(f"--nproc must be at least 2 for data-parallel training, got {nproc}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "loopfm.distributed.fm_train", "--run-dir", str(run_dir),
    ]  # fmt: skip
    from loopfm.core.children import dies_with_this_process, held_fds
    from loopfm.pipeline.services import stop_server

    # torchrun dies with this process and holds the run's lock until it has stopped its ranks
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=dies_with_this_process(),
                            pass_fds=held_fds())  # fmt: skip
    try:
        code = proc.wait()
    except BaseException:  # a stop signal: SIGTERM to torchrun, which stops its ranks (a SIGKILL would orphan them)
        stop_server(proc)
        raise
    if code != 0:
        raise RuntimeError(f"data-parallel FM training failed: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        paths, cfg = RunPaths(args.run_dir), RunConfig.load(args.run_dir)
        summary = train_fm(paths, cfg, progress=rank == 0, rank=rank, world_size=world_size)
        digests: list[str | None] = [None] * world_size
        dist.all_gather_object(digests, summary["parameter_sha256"])
        if rank == 0:
            last = torch.load(checkpoint_path(paths, cfg.world.n_days), weights_only=False)
            report = {
                "world_size": world_size, "seconds": summary["seconds"], "rank_parameter_sha256": digests,
                "checkpoint_sha256": parameter_digest(last["fm"], last["compressor"]),
            }  # fmt: skip
            write_text(paths.fm / "distributed.json", json.dumps(report, indent=2))
            print(f"trained on {summary['events']} events in {summary['seconds']:.1f} s on {world_size} ranks")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
