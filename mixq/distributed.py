"""Several processes: one run spread over the ranks of torch.distributed (`torchrun --nproc-per-node N -m mixq
quantize …`, or `mixq quantize --workers N`, which starts them).

Every rank loads (or streams) the model, reads the same calibration and runs each block's forward passes, so that
every rank holds the same block inputs. The work inside a block is what is shared out, in turns (`Turns`): the
profile's solver calls (a group of layers × the candidates solved in one call) and the apply's layers. What a rank
computed is gathered to every rank after each block (`gather`), so every rank goes on from the same profile and
the same quantized block; the plan, the packed model and the written files are the single process's (each unit of
work is computed whole, by one rank, as the single process computes it). The main rank alone writes (checkpoint,
packed blocks, the output folder) and evaluates.

A rank that stops makes the others fail in their next gathering; `RankLost` says so in one line, and the same
command resumes from what the main rank wrote."""
from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch

TIMEOUT = timedelta(minutes=30)  # how long a rank waits for the others at a gathering


class RankLost(RuntimeError):
    """Another rank stopped (it failed, or was killed) while this one waited for it."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def turns(self) -> "Turns":
        return Turns(self)


class Turns:
    """Work units dealt out in turns: every rank asks for each unit in the same order, and unit k is rank k mod N's
    (`mine()` says whether the next one is this rank's)."""

    def __init__(self, ranks: Ranks):
        self.ranks, self.k = ranks, 0

    def mine(self) -> bool:
        k, self.k = self.k, self.k + 1
        return k % self.ranks.world == self.ranks.rank


def launched() -> bool:
    """Whether this process is one of several ranks that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str = "cpu") -> Ranks:
    """Join the run's process group (gloo on the CPU, nccl on GPUs) where torchrun started several ranks; this
    process's place (rank 0 of 1 where it runs alone)."""
    import torch.distributed as dist

    if not launched():
        return Ranks()
    if not dist.is_initialized():
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo", timeout=TIMEOUT)
    return current()


def current() -> Ranks:
    """This process's place in the run (rank 0 of 1 without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size())


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] alone). A rank that stopped: RankLost."""
    import torch.distributed as dist

    ranks = current()
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    try:
        dist.all_gather_object(out, obj)
    except (RuntimeError, ConnectionError) as e:
        raise RankLost(f"another rank of this run stopped ({_first_line(e)}): run the same command again to resume "
                       "from what was written") from None
    return out


def merged_damage(parts: list[list[float]]) -> list[float]:
    """One layer's damages from every rank's profile of it: each entry from the rank that computed it (the others
    hold NaN there)."""
    out = []
    for values in zip(*parts):
        computed = [v for v in values if v == v]
        out.append(computed[0] if computed else float("nan"))
    return out


def stop() -> None:
    """Leave the process group (at the end of a run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


LAUNCHED_BY_MIXQ = "MIXQ_WORKERS"  # set for the ranks `launch` starts: it reports a lost rank itself


def silent(error: BaseException) -> bool:
    """Whether this process leaves `error` unsaid, so that a run of several ranks ends in one line: a rank other
    than the main one says nothing (the main one meets the same bad input, or loses a rank); under `launch`, a lost
    rank is the launcher's to report."""
    rank = int(os.environ.get("RANK", "0")) if launched() else 0  # (torchrun's: known before the group is joined)
    return rank != 0 or (isinstance(error, RankLost) and os.environ.get(LAUNCHED_BY_MIXQ) == "1")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def launch(workers: int, argv: list[str]) -> int:
    """Run `mixq <argv>` as `workers` ranks on this machine (torchrun's launcher, a free port of its own); the exit
    code. A rank that fails is reported in one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # (its own report of a failure)
    kept = dict(os.environ)
    os.environ[LAUNCHED_BY_MIXQ] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))  # the cores, shared out
    try:
        elastic_launch(config, sys.executable)("-m", "mixq", *argv)
    except ChildFailedError as e:
        # a rank that ended with 2 reported an error (rank 0) or met a lost rank, and the launcher stops the rest
        # (SIGTERM): the one that ended otherwise (killed, crashed) is the lost one
        lost = sorted((f.exitcode == -signal.SIGTERM, f.timestamp, rank, f.exitcode)
                      for rank, f in e.failures.items() if f.exitcode != 2)
        if not lost:  # bad input, which rank 0 said
            return 2
        *_, rank, code = lost[0]
        raise RankLost(f"rank {rank} of {workers} failed (exit code {code}): run the same command again to resume "
                       "from what was written") from None
    finally:
        os.environ.clear()
        os.environ.update(kept)
    return 0

