"""--tp-degree N: the whole mode runs in N ranks, each holding its shard of the submission (and of the reference
it is timed against); rank 0 prints and writes, the others compute the same steps in lockstep and keep quiet.

moebench starts the ranks itself (gloo on 127.0.0.1 on the CPU), or joins the group of a `torchrun
--nproc-per-node N` launch (NCCL on GPUs)."""

import os
import sys

import torch
from torch import distributed as dist

from moebench.cli.args import RunConfig
from moebench.errors import MoebenchError


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def run_tensor_parallel(run: RunConfig, argv: list[str] | None) -> int:
    """Runs the mode of `argv` over run.tp_degree ranks; returns rank 0's exit code."""
    from moebench.engine.parallel import RankFailed, check_shardable, init_from_env, run_parallel
    from moebench.modes.setup import open_source

    if launched_by_torchrun():
        rank, world, _ = init_from_env()
        if world != run.tp_degree:
            raise MoebenchError(f"--tp-degree {run.tp_degree} but torchrun started {world} ranks")
        from moebench.cli.main import run_mode

        _quiet_unless_first(rank)
        return run_mode(run)
    check_shardable(open_source(run).config, run.tp_degree)  # before any process starts; writes the embedded model
    try:
        return run_parallel(_rank_main, run.tp_degree, sys.argv[1:] if argv is None else list(argv))
    except RankFailed as e:
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        raise MoebenchError(f"--tp-degree {run.tp_degree}: a rank failed: {last}") from None


def _rank_main(rank: int, world: int, argv: list[str]) -> int:
    from moebench.cli.main import main

    _quiet_unless_first(rank)
    return main(argv)  # the process group is up, so main runs the mode here


def _quiet_unless_first(rank: int) -> None:
    if rank:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def parallelize(model: torch.nn.Module, run: RunConfig) -> torch.nn.Module:
    """Inside a rank: this rank's shard of a loaded model (the model as it is with --tp-degree 1)."""
    if run.tp_degree == 1:
        return model
    from moebench.engine.parallel import shard_model

    reduce_dtype = getattr(torch, run.rpl_reduce_dtype) if run.rpl_reduce_dtype else None
    return shard_model(model, dist.get_rank(), run.tp_degree, vocab_parallel=run.vocab_parallel,
                       reduce_dtype=reduce_dtype)
