"""Process-group set-up and rank helpers.

Works for a plain `python run_x.py` (one process, no process group), for
`python -m torch.distributed.launch` (which passes `--local-rank=N` on torch 2.x
and `--local_rank=N` on older versions, and sets LOCAL_RANK) and for `torchrun`
(single or multi-node: RANK / WORLD_SIZE / LOCAL_RANK in the environment).
gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import argparse
import builtins
import datetime
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar('T')


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _silence_non_main_ranks(is_main: bool) -> None:
    """Only rank 0 prints, unless a call passes force=True (as upstream's helper)."""
    builtin_print = builtins.print

    def print_main_only(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_main or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_main_only


def restart_safe_store(dist_url: str, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The process group's store for a worker that torchrun restarts on one node
    (--max-restarts), else None (torch's own env:// rendezvous). A restarted group is handed the
    launcher's store with the failed attempt's keys still in it (torch 2.14 adds no per-attempt
    prefix), so the new ranks read the dead ranks' addresses: gloo's connectFullMesh is refused, or
    they hang (5 of 6 restarts failed so on CPU). Every worker on one node sees the same
    TORCHELASTIC_RESTART_COUNT, so keys prefixed with it are fresh for each attempt. On several
    nodes the agents may count restarts differently, and torch's handling is kept."""
    env = os.environ
    if (dist_url != 'env://' or env.get('TORCHELASTIC_USE_AGENT_STORE') != 'True'
            or env.get('LOCAL_WORLD_SIZE') != env.get('WORLD_SIZE')):
        return None
    store = dist.TCPStore(env['MASTER_ADDR'], int(env['MASTER_PORT']), world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f'restart{env.get("TORCHELASTIC_RESTART_COUNT", "0")}/', store)


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Set args.distributed, args.rank, args.world_size, args.gpu and the device.

    A launcher is recognised by RANK and WORLD_SIZE in the environment. Without one
    the run is a single process and no process group is created.
    """
    asked = args.world_size
    launched = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    if launched:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', max(args.local_rank, 0)))
    else:
        args.rank, args.world_size, args.gpu = 0, 1, 0
    # --world_size is upstream's spelling of the intended count (its default 1 means "not given"); the
    # effective batch and lr follow the real count
    if asked not in (1, args.world_size) and args.rank == 0:
        # torch.distributed.launch hands each process --local-rank; torchrun only the environment
        launcher = 'python -m torch.distributed.launch' if getattr(args, 'local_rank', -1) >= 0 else 'torchrun'
        print(f'note: --world_size {asked}, but {args.world_size} process(es) '
              f'{"were started by the launcher" if args.world_size > 1 else "run (no launcher)"}: the run uses '
              f'{args.world_size}; start {asked} with {launcher} --nproc_per_node={asked} for the batch you asked for',
              flush=True)
    if not launched:
        args.distributed = False
        return

    args.distributed = True
    use_cuda = str(args.device).startswith('cuda')
    if use_cuda:
        if not torch.cuda.is_available():
            raise SystemExit('error: --device cuda was asked for but no CUDA GPU is visible; '
                             'use --device cpu (gloo) for CPU runs')
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    backend = args.dist_backend or ('nccl' if use_cuda else 'gloo')
    print(f'| distributed init (rank {args.rank}/{args.world_size}, backend {backend}): '
          f'{args.dist_url}', flush=True)
    timeout = datetime.timedelta(minutes=30)
    store = restart_safe_store(args.dist_url, args.world_size, timeout)
    dist.init_process_group(backend=backend, init_method=None if store else args.dist_url, store=store,
                            world_size=args.world_size, rank=args.rank, timeout=timeout)
    dist.barrier()
    _silence_non_main_ranks(args.rank == 0)


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


def on_main(fn: Callable[[], T]) -> T:
    """fn() run by rank 0 alone, its result handed to every rank (e.g. which checkpoint to resume
    from). An `error:` exit of rank 0's call (a SystemExit with a message) stops every rank with
    that message: alone, rank 0 would leave its peers to die in the next collective with a
    "Connection closed by peer" traceback."""
    if not is_dist():
        return fn()
    result, problem, raised = None, None, None
    if is_main_process():
        try:
            result = fn()
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            problem, raised = e.code, e
    shared = [(result, problem)]
    dist.broadcast_object_list(shared, src=0)
    result, problem = shared[0]
    if problem is not None:
        raise raised or SystemExit(problem)
    return result


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (returns the input on a single process); exact for counts,
    where a mean times the world size is not (61 / 7 * 7 = 60.99999999999999)."""
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (returns the input on a single process)."""
    return all_reduce_sum(x) / get_world_size() if is_dist() else x
