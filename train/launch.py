"""One process to many nodes: the same recipe under torchrun, and a Slurm script for it.

    distillery train pretrain.yaml                      # one process
    distillery train pretrain.yaml --nproc 2            # DDP on this machine (gloo on CPU, NCCL on GPU)
    distillery train pretrain.yaml --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1
    distillery train pretrain.yaml --nproc 8 --nnodes 4 --emit-slurm job.sbatch

``--nproc`` re-runs the same command under ``torch.distributed.run`` (torchrun); each process finds
its rank in the environment torchrun sets, joins the process group and reads its share of every
global batch. Rank 0 alone writes metrics, checkpoints and the manifest.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass

LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--emit-slurm",
                  "--emit-accelerate")  # fmt: skip


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def as_a_job_of_one(enabled: bool = True):
    """The environment torchrun would give a job of one process, for the length of the block: what
    DeepSpeed needs to run at all (ZeRO-Offload on one GPU), without a launcher."""
    if not enabled or "WORLD_SIZE" in os.environ:
        yield
        return
    import socket

    with socket.socket() as s:  # a free port for the process group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup() -> Dist:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU); else one process."""
    import torch

    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(device="cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def teardown(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def strip_launch_options(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def torchrun_arguments(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                       master_addr: str = "127.0.0.1", master_port: int = 29500) -> list[str]:  # fmt: skip
    """torchrun's arguments to run ``distillery ARGV`` in ``nproc`` processes per node."""
    return [f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--master_addr={master_addr}", f"--master_port={master_port}",
            "-m", "manifests.cli", *strip_launch_options(argv)]  # fmt: skip


def relaunch(
    argv: list[str], nproc: int, nnodes: int, node_rank: int, master_addr: str, master_port: int
) -> int:
    """Run the command again under torchrun, from this process, and wait for it.

    torchrun's agent runs here (``torch.distributed.run.run``) rather than as a program, so that a
    failed run ends in one line: the processes leave their error line in a folder instead of
    printing it (``manifests.cli``), and the first failure's is printed here -- not one per process
    plus torchrun's traceback and its agent's log lines.
    """
    import logging
    import tempfile
    from pathlib import Path

    from torch.distributed import DistError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    from manifests.cli import ERROR_DIR, PEER_FAILED

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    for name in list(logging.root.manager.loggerDict):  # the agent's modules set their own levels
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="distillery-errors-") as folder:
        os.environ[ERROR_DIR] = folder
        arguments = torchrun_arguments(argv, nproc, nnodes, node_rank, master_addr, master_port)
        try:
            torchrun.run(torchrun.parse_args(arguments))
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            said = {
                int(p.stem): json.loads(p.read_text())
                for p in Path(folder).glob("*.json")
                if p.stem.isdigit()
            }
            # The process that failed for a reason of its own, not because a peer had gone.
            causes = [r for r in sorted(said) if not said[r]["message"].startswith(PEER_FAILED)] or sorted(
                said
            )
            if causes:
                rank = rank if rank in causes else causes[0]
                message, code = said[rank]["message"], said[rank]["code"]
            elif failure.exitcode < 0:
                message = f"process {rank} of the run was killed (signal {-failure.exitcode})"
                code = 128 - failure.exitcode
            else:
                message = f"process {rank} of the run exited with code {failure.exitcode}; its output above says why"
                code = failure.exitcode
            print(f"error: {message}", file=sys.stderr)
            return code
        except SignalException as e:  # Ctrl-C, or a scheduler's SIGTERM: the agent stopped the processes
            print(f"error: stopped by {e.sigval.name}; nothing was published -- '--resume' continues from the "
                  "last checkpoint", file=sys.stderr)  # fmt: skip
            return 128 + int(e.sigval)
        except (DistError, RendezvousError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: the processes could not meet at {master_addr}:{master_port} ({reason}); if another run "
                  "uses that port, pass --master-port", file=sys.stderr)  # fmt: skip
            return 1
        finally:
            del os.environ[ERROR_DIR]
    return 0


def slurm_script(argv: list[str], nproc: int, nnodes: int, job_name: str, gpus: bool = True) -> str:
    """An sbatch script that runs the same command on ``nnodes`` nodes of ``nproc`` processes each."""
    inner = shlex.join(["-m", "manifests.cli", *strip_launch_options(argv)])
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nnodes}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --gpus-per-node={nproc}"] if gpus else [f"#SBATCH --cpus-per-task={nproc}"]),
        "#SBATCH --output=%x-%j.out",
        "set -euo pipefail",
        "# One torchrun per node; they meet at the first node of the allocation.",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"srun {shlex.quote(sys.executable)} -m torch.distributed.run --nnodes={nnodes} --nproc_per_node={nproc} "
        f'--rdzv_backend=c10d --rdzv_endpoint="$head:29500" --rdzv_id="$SLURM_JOB_ID" {inner}',
    ]
    return "\n".join(lines) + "\n"
