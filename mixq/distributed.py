"""Several processes: one run spread over the ranks of torch.distributed (`torchrun --nproc-per-node N -m mixq
quantize …`, or `mixq quantize --workers N`, which starts them).

The main rank (0) runs the whole job as a single process would: it loads (or streams) the model, reads the
calibration, runs each block's forward passes, writes and evaluates. The other ranks load nothing: they `serve`,
each computing the units of work the main rank deals to it (`Dealer`) from the tensors it is sent with them: the
profile's solver calls (a group of layers × the candidates solved in one call, on the group's statistics) and the
apply's layers (a weight and its statistics). Every rank thus holds only what it works on. What they computed is
sent back to the main rank at the end of each block (`Dealer.settle`); each unit is computed whole, by one rank, as
the single process computes it, so the plan, the packed model and the written files are the single process's.

A rank that stops makes the others fail where they next send or receive; `RankLost` says so in one line, and the
same command resumes from what the main rank wrote."""
from __future__ import annotations

import io
import logging
import os
import pickle
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


class Dealer:
    """The main rank's dealing of a run's work, block by block (the other ranks have none: they `serve`). Units are
    dealt in turns, unit k to rank k mod N, and a rank's share of a group of units goes to it as one call of `run`: the
    others' first, sent and computed there while the main rank computes its own. `settle` (at the end of a block)
    receives what the others computed and hands each result to its `then`. Alone, every call runs here at once."""

    def __init__(self, ranks: Ranks | None = None):
        self.ranks = ranks or current()
        self.k = 0
        self.waiting: dict[int, list] = {r: [] for r in range(1, self.ranks.world)}  # rank → `then`s, in order
        self.sending: list = []  # the sends in flight (their tensors kept until done)

    def deal(self, units: list, alone: bool = False) -> dict[int, list]:
        """{rank: its share of `units`}, the other ranks first and the main one last; `alone`: all to the main
        rank (work that needs the model, which only the main rank holds)."""
        shares: dict[int, list] = {}
        for unit in units:
            rank = 0 if alone else self.k % self.ranks.world
            self.k += not alone
            shares.setdefault(rank, []).append(unit)
        return dict(sorted(shares.items(), key=lambda kv: kv[0] == 0))

    def run(self, rank: int, fn, args: tuple, then) -> None:
        """then(fn(*args)), computed by `rank` (fn: a module-level function; args: what it reads, sent to it)."""
        if rank == 0:
            then(fn(*args))
            return
        self.sending += _send(("call", fn, args), rank)
        self.waiting[rank].append(then)

    def settle(self) -> None:
        """Receive every result the other ranks owe, in order, and hand each to its `then`."""
        for rank, thens in self.waiting.items():
            while thens:
                how, result = _receive(rank)
                if how == "failed":
                    raise result
                thens.pop(0)(result)
        _wait(self.sending)
        self.sending = []


def serve(device) -> int:
    """What a rank other than the main one does for the whole run: compute the units the main rank sends it (onto
    `device`) and send back their results, until it is told to stop; how many it computed."""
    served, sending = 0, []
    while True:
        message = _receive(0, device)
        if message[0] == "stop":
            _wait(sending)
            return served
        _, fn, args = message
        try:
            result = ("done", fn(*args))
        except Exception as e:  # (the main rank raises it, as it would have where it computed the unit itself)
            result = ("failed", e)
        # not waited for: the main rank receives results when its own share of the block is done, and this rank
        # goes on to the next unit meanwhile
        sending = [s for s in sending if not s[0].is_completed()] + _send(result, 0)
        served += 1
        del message, fn, args, result  # (not held while the next one comes)


def dismiss() -> None:
    """The main rank tells the others that the run is over (at its end, or where it failed: a rank still busy
    then finds the main rank gone, and stops without a word)."""
    ranks = current()
    for rank in range(1, ranks.world):
        try:
            _wait(_send(("stop",), rank), timedelta(seconds=5))
        except (RuntimeError, ConnectionError, RankLost):
            pass


def _send(obj, rank: int) -> list:
    """Send `obj` to `rank` (pickled, its tensors sent as they are, not copied into the pickle): the sends in
    flight, to wait for."""
    import torch.distributed as dist

    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    shapes, body = pickle.dumps([(t.dtype, t.shape) for t in pickler.tensors]), buffer.getvalue()
    wire = _wire()
    parts = [torch.tensor([len(shapes), len(body)], device=wire),
             torch.frombuffer(bytearray(shapes + body), dtype=torch.uint8).to(wire)]
    parts += [t.reshape(-1).view(torch.uint8).to(wire) for t in pickler.tensors if t.numel()]
    try:
        return [(dist.isend(p, rank), p) for p in parts]
    except (RuntimeError, ConnectionError) as e:
        raise _lost(e) from None


def _receive(rank: int, device=None):
    """What `rank` sent with `_send` (its tensors on `device`, the wire's where None)."""
    import torch.distributed as dist

    wire = _wire()
    try:
        sizes = torch.empty(2, dtype=torch.int64, device=wire)
        dist.recv(sizes, rank)
        head = torch.empty(int(sizes.sum()), dtype=torch.uint8, device=wire)
        dist.recv(head, rank)
        head = head.cpu().numpy().tobytes()
        tensors = []
        for dtype, shape in pickle.loads(head[:int(sizes[0])]):
            t = torch.empty(shape, dtype=dtype, device=wire)
            if t.numel():
                dist.recv(t.reshape(-1).view(torch.uint8), rank)
            tensors.append(t if device is None else t.to(device))
    except (RuntimeError, ConnectionError) as e:
        raise _lost(e) from None
    return _Unpickler(io.BytesIO(head[int(sizes[0]):]), tensors).load()


class _Pickler(pickle.Pickler):
    """A pickle with its tensors left out (`tensors`, sent as they are). (A class of its own, not one made in each
    call: a class made there would keep the tensors it closes over until the garbage collector's next cycle.)"""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []

    def persistent_id(self, o):
        if isinstance(o, torch.Tensor):
            self.tensors.append(o.detach().contiguous())
            return len(self.tensors) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list[torch.Tensor]):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]


def _wait(sending: list, timeout: timedelta | None = None) -> None:
    try:
        for work, _ in sending:
            work.wait(timeout) if timeout is not None else work.wait()
    except (RuntimeError, ConnectionError) as e:
        raise _lost(e) from None


def _wire() -> torch.device:
    """Where sent tensors travel from: the GPU of this rank under nccl, else the CPU (gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _lost(e: BaseException) -> RankLost:
    return RankLost(f"another rank of this run stopped ({_first_line(e)}): run the same command again to resume "
                    "from what was written")


def stop() -> None:
    """Leave the process group (at the end of a run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


LAUNCHED_BY_MIXQ = "MIXQ_WORKERS"  # set for the ranks `launch` starts: it reports a lost rank itself
SAID, UNSAID = 2, 3  # the exit codes of a rank that said its error, and of one that left it unsaid (`silent`)


def silent(error: BaseException) -> bool:
    """Whether this process leaves `error` unsaid (it exits with UNSAID), so that a run of several ranks ends in
    one line: a rank other than the main one says nothing (the main one says what went wrong, or loses a rank);
    under `launch`, a lost rank is the launcher's to report."""
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
        # the main rank said what went wrong (SAID), and the launcher stopped the rest (SIGTERM) where they had
        # not ended yet; or a rank was lost: the others met it (UNSAID) or were stopped, and the one that ended
        # otherwise (killed, crashed) is the lost one
        if any(f.exitcode == SAID for f in e.failures.values()):
            return SAID
        lost = sorted((f.exitcode == -signal.SIGTERM, f.timestamp, rank, f.exitcode)
                      for rank, f in e.failures.items() if f.exitcode != UNSAID)
        *_, rank, code = lost[0]
        raise RankLost(f"rank {rank} of {workers} failed (exit code {code}): run the same command again to resume "
                       "from what was written") from None
    finally:
        os.environ.clear()
        os.environ.update(kept)
    return 0

