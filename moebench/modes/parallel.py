"""--tp-degree N: the whole mode runs in N ranks, each holding its shard of the submission (and of the reference
it is timed against); rank 0 prints and writes, the others compute the same steps in lockstep and keep quiet.

moebench starts the ranks itself (gloo on 127.0.0.1 on the CPU), or joins the group of a `torchrun
--nproc-per-node N` launch (NCCL on GPUs)."""

import io
import sys

import torch
from torch import distributed as dist

from moebench.cli.args import RunConfig
from moebench.errors import MoebenchError


def run_tensor_parallel(run: RunConfig, argv: list[str] | None) -> int:
    """Runs the mode of `argv` over run.tp_degree ranks; returns rank 0's exit code."""
    from moebench.engine.parallel import RankFailed, check_shardable, init_from_env, launched_by_torchrun, run_parallel
    from moebench.modes.setup import device_of, open_source

    argv = sys.argv[1:] if argv is None else list(argv)
    if launched_by_torchrun():
        rank, world, _ = init_from_env()  # (world is --tp-degree: parse_args checked)
        return _torchrun_rank(rank, world, argv)
    if device_of(run).type == "cuda":
        raise MoebenchError(f"--tp-degree {run.tp_degree} on GPUs: start the ranks with torchrun --nproc-per-node "
                            f"{run.tp_degree} (moebench's own ranks are CPU processes)")
    check_shardable(open_source(run).config, run.tp_degree)  # before any process starts; writes the embedded model
    try:
        return run_parallel(_started_rank, run.tp_degree, argv)
    except RankFailed as e:
        rank, first = e.errors[0]
        last = [line for line in first.splitlines() if line.strip()][-1]
        if "moebench: error: " in last:  # a user error: its line is the message, no traceback
            if e.rank0 == MoebenchError.exit_code and all("moebench: error: " in err for _, err in e.errors):
                return e.rank0  # rank 0 met a user error too, and has printed its line
            raise MoebenchError(f"--tp-degree {run.tp_degree}: rank {rank}: "
                                f"{last.split('moebench: error: ', 1)[1]}") from None
        print(first, file=sys.stderr, end="")  # the first cause, in full; the others mostly follow from it
        early = "".join(f"; rank {r} had ended before ({why})" for r, why in sorted(e.ended.items()))
        raise MoebenchError(f"--tp-degree {run.tp_degree}: rank {rank} failed: {last}{early}") from None


def _rank_main(rank: int, world: int, argv: list[str]) -> int:
    """One rank: main() again (the process group is up, so it runs the mode here). Rank 0 reports; the others keep
    quiet, and a user error only they meet becomes their failure, so the launcher can name it."""
    from moebench.cli.main import main

    return main(argv) if rank == 0 else _quiet_main(argv)[0]


def _torchrun_rank(rank: int, world: int, argv: list[str]) -> int:
    """_rank_main in a rank that torchrun started. A check's verdict (exit code 1) is rank 0's, as its report and
    records are (another rank's caching audit times its own requests), and torchrun fails the whole job when any
    rank exits with a code but 0: another rank exits 0 once its mode ran, whatever its checks found. (A failure
    only it met still ends it with its traceback.)"""
    if rank == 0:
        return _rank_main(rank, world, argv)
    _quiet_main(argv)
    return 0


def _started_rank(rank: int, world: int, argv: list[str]) -> int | str:
    """_rank_main in a rank that run_parallel started. Another rank returns its exit code and last lines of output:
    where it ended while rank 0 went on (a failure only it met, its collectives left unmatched), they hold the cause."""
    if rank == 0:
        return _rank_main(rank, world, argv)
    code, last = _quiet_main(argv)
    return f"exit code {code}" + (f": {last}" if last else "")


def _quiet_main(argv: list[str]) -> tuple[int, str]:
    """main() printing nothing: (its exit code, its last lines of output); an exit code other than 0 or 1 raises."""
    from moebench.cli.main import main

    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    code = main(argv)
    if code not in (0, 1):
        lines = sys.stderr.getvalue().strip().splitlines() or [f"exit code {code}"]
        raise RuntimeError(lines[-1])
    return code, " | ".join(line.strip() for line in sys.stdout.getvalue().strip().splitlines()[-3:])


def parallelize(model: torch.nn.Module, run: RunConfig) -> torch.nn.Module:
    """Inside a rank: this rank's shard of a loaded model (the model as it is with --tp-degree 1)."""
    if run.tp_degree == 1:
        return model
    from moebench.engine.parallel import shard_model

    reduce_dtype = getattr(torch, run.rpl_reduce_dtype) if run.rpl_reduce_dtype else None
    return shard_model(model, dist.get_rank(), run.tp_degree, vocab_parallel=run.vocab_parallel,
                       reduce_dtype=reduce_dtype, sequence_parallel=run.sequence_parallel_enabled)
