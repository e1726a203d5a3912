"""Start-of-run set-up shared by every entry script: device, mixed precision, process group,
seeds, output folder."""
from __future__ import annotations

import argparse
import atexit
import errno
import json
import math
import os
import random
import re
import signal
import sys
import time
import traceback
from typing import Any, Callable, NoReturn

import numpy as np
import torch

from util import dist, startup
from util.cli import check_output_folder
from util.checkpoint import CheckpointError, first_missing_folder, newest_checkpoint, remove_if_unused
from util.data import UnreadableImage, require_data_path
from util.log import require_tensorboard


def check_number_flags(args: argparse.Namespace) -> None:
    """Flags shared by the entry scripts that torch or numpy would otherwise refuse with a traceback
    (or that would train nonsense): a clear SystemExit before any work. Flags a script lacks are
    skipped."""
    def value(flag: str):
        return getattr(args, flag, None)

    for flag in ('lr', 'blr', 'min_lr', 'weight_decay', 'warmup_epochs'):
        v = value(flag)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise SystemExit(f'error: --{flag} must be a finite number >= 0, got {v}')
    seed = value('seed')
    if seed is not None and not 0 <= seed <= 2 ** 32 - 1 - 4096:  # numpy's range, less a rank offset
        raise SystemExit(f'error: --seed must be in [0, {2 ** 32 - 1 - 4096}], got {seed}')
    if (value('num_workers') or 0) < 0:
        raise SystemExit(f'error: --num_workers must be 0 or more, got {args.num_workers}')
    start, epochs = value('start_epoch'), value('epochs')
    if start is not None and (start < 0 or (epochs is not None and 0 < epochs <= start)):  # epochs < 1: its own error
        raise SystemExit(f'error: --start_epoch must be in [0, --epochs {epochs}), got {start}')


def note_lr_schedule(args: argparse.Namespace) -> None:
    """Once args.lr is set: notes for schedules that run but hardly train, as upstream would run
    them: a peak lr of 0; a warmup as long as the run (no decay); a cosine from lr "down" to
    --min_lr that would rise (a tiny batch can take the lr below the default min_lr). FreezeOut's
    layers anneal to 0 and do not use --min_lr."""
    if args.lr == 0:
        print('note: the peak lr is 0 (--lr 0 or --blr 0): the weights will not change')
    warmup, epochs = getattr(args, 'warmup_epochs', None), getattr(args, 'epochs', None)
    if warmup is not None and epochs and warmup >= epochs:
        print(f'note: --warmup_epochs {warmup:g} >= --epochs {epochs}: the lr only rises, reaching its '
              f'peak at the end, with no decay; lower --warmup_epochs for one')
    if getattr(args, 't_0', None) is None and args.min_lr > args.lr > 0:
        print(f'note: --min_lr {args.min_lr:g} is above the peak lr {args.lr:.3g}, so the cosine after the '
              f'warmup rises to it; lower --min_lr (or raise --lr / --blr) for a decay')


def set_lr(args: argparse.Namespace) -> int:
    """args.lr = blr x effective batch / 256 unless --lr was given (upstream's rule), with
    note_lr_schedule's notes; returns the effective batch (batch x accum_iter x processes)."""
    eff_batch = args.batch_size * args.accum_iter * dist.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    note_lr_schedule(args)
    return eff_batch


def resolve_device_and_amp(args: argparse.Namespace) -> torch.device:
    """--device None -> cuda when available, else cpu; --amp auto -> bf16 on GPUs that support
    it, none on CPU. Idempotent: called before the process group (which reads --device) and
    after it (which pins cuda:<local rank>)."""
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if str(args.device).startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda but no CUDA GPU is visible; use --device cpu')
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f'error: unknown --device {args.device}; use cuda, cuda:<index> or cpu') from None
    if args.amp == 'auto':
        args.amp = 'bf16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'none'
    if device.type == 'cpu' and args.amp == 'fp16':
        raise SystemExit('error: --amp fp16 needs a GPU; use --amp none or bf16 on CPU')
    return device


def setup(args: argparse.Namespace) -> torch.device:
    """Process group, device, AMP mode, per-rank seeds, output folder. Returns this process's device."""
    check_number_flags(args)
    resolve_device_and_amp(args)
    dist.init_distributed_mode(args)
    device = resolve_device_and_amp(args)
    if hasattr(args, 'log_dir'):
        args.log_dir = args.log_dir or args.output_dir

    if getattr(args, 'data_path', None):
        require_data_path(args.data_path)

    def check_outputs() -> None:
        for flag in ('output_dir', 'log_dir'):
            folder = getattr(args, flag, None)
            if folder:  # a folder that refuses files: said now, not after the training
                made_from = first_missing_folder(folder)
                check_output_folder(folder, f'--{flag} {folder}')
                if made_from is not None:  # a run that stops before writing anything leaves no empty folder
                    atexit.register(remove_if_unused, folder, made_from, os.getpid())
        if getattr(args, 'log_dir', None) and not getattr(args, 'eval', False):  # --eval writes no events
            require_tensorboard()  # before the data set-up and the run folder's changes, not after
    dist.on_main(check_outputs)
    print('args: ' + json.dumps(vars(args), default=str))
    seed = args.seed + dist.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.benchmark = True
    return device


def allow_recompiles(graphs: int, config=None) -> None:
    """Lets torch.compile keep at least `graphs` graphs per function: each FreezeOut event changes
    the graph once, and past dynamo's limit (8 by default) it silently falls back to eager.
    The setting is `recompile_limit` on current torch, `cache_size_limit` on older releases."""
    if config is None:
        import torch._dynamo.config as config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
    setattr(config, name, max(getattr(config, name), graphs))


def resume_hint(args: argparse.Namespace, rerun: str = 'the same command') -> str:
    """How to continue an interrupted training run, judged by what its folder holds now; `rerun`
    names the command that would (e.g. 'that command', after advice to change flags)."""
    folder = getattr(args, 'output_dir', None)
    if not folder or getattr(args, 'eval', False):
        return ''
    try:
        newest = newest_checkpoint(folder, resuming=False)
    except (CheckpointError, KeyError, ValueError):
        newest = None
    if newest is None:
        return f'; no checkpoint was saved yet: {rerun} starts again'
    if getattr(args, 'resume', None):
        return f'; to continue from the newest checkpoint saved, rerun with --resume {newest}'
    if not getattr(args, 'auto_resume', True):
        return f'; to continue, rerun without --no_auto_resume (it resumes from {newest})'
    return f'; {rerun} resumes from {newest}'


def out_of_memory_line(args: argparse.Namespace, error: BaseException, resumable: bool) -> str:
    """The one line a GPU out-of-memory stop ends with: torch's first sentences (what was asked,
    what the card had free) and the flags that trade memory for steps at the same effective batch."""
    what = ' '.join(re.split(r'(?<=\.)\s+', str(error).strip())[:3])
    batch = getattr(args, 'batch_size', None)
    if batch is None:
        advice = ''
    elif batch == 1:
        advice = '; --batch_size is 1 already: a smaller --model or --input_size would need less'
    elif hasattr(args, 'accum_iter'):
        factor = next(d for d in range(2, batch + 1) if batch % d == 0)  # keeps batch x accum_iter exact
        advice = (f'; try --batch_size {batch // factor} --accum_iter {args.accum_iter * factor} (the same '
                  f'effective batch, so the same lr)')
    else:
        advice = f'; lower --batch_size (now {batch})'
    hint = resume_hint(args, 'that command' if advice else 'the same command') if resumable else ''
    return f'error: out of GPU memory ({what}){advice}{hint}'


class Terminated(BaseException):
    """SIGTERM (a scheduler's preemption, `timeout`). A BaseException, as KeyboardInterrupt, so
    that no `except Exception` on the way swallows it."""


def _terminate_main_process(main_pid: int) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked DataLoader worker: die as without the handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # the loader workers got the signal too (a process group's); torch's SIGCHLD handler
        # would report their deaths as an error while this one unwinds. A no-op rather than
        # SIG_DFL: Python raises on a pending signal whose handler became SIG_DFL
        signal.signal(signal.SIGCHLD, lambda *_: None)
        raise Terminated()
    return handler


_SIGTERM_HANDLER_CODE = _terminate_main_process(0).__code__


def _raised_in_sigterm_handler(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or during, came out of the SIGTERM handler
    above: torch's SIGCHLD handler, its signal pending too, can run at the handler's very first
    instruction (CPython checks for signals on entering a frame) and report the loader workers'
    death by the same SIGTERM as an error, which the DataLoader may wrap in one of its own."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is _SIGTERM_HANDLER_CODE:
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


# what a collective raises when another rank died first (gloo; NCCL's watchdog)
_PEER_FAILED = ('Connection closed by peer', 'Connection reset by peer', 'remote process exited')
_COMMUNICATION_LIBRARIES = ('gloo', 'NCCL', 'nccl', 'ProcessGroup')


def _peer_lost(e: BaseException) -> str | None:
    """'Connection closed by peer [10.0.0.2]:5432' when `e` is a collective that broke because
    another process of a group of several died first, else None. Only from the communication
    library: a data loader's socket error quoting the same words (or an OSError) is no such thing."""
    text = str(e)
    phrase = next((p for p in _PEER_FAILED if p in text), None)
    from_library = isinstance(e, torch.distributed.DistError) or any(lib in text for lib in _COMMUNICATION_LIBRARIES)
    if phrase is None or isinstance(e, OSError) or not from_library or not dist.is_dist() or dist.get_world_size() < 2:
        return None
    return re.search(re.escape(phrase) + r'( \[[^\]]*\]:\d+)?', text).group(0)  # with the peer's address


def tell_launcher(message: str, after_a_peer: bool = False) -> bool:
    """Under torchrun / torch.distributed.launch, write why this rank stops to the file the launcher
    names in TORCHELASTIC_ERROR_FILE: its closing summary ("Root Cause") then shows `message`
    instead of a link to the docs, below the other ranks' output that buries this rank's lines.
    In ErrorHandler.record_exception's format, which the launcher reads back. Nothing outside a
    launcher, and a file that cannot be written is skipped (the rank's own output still says it).
    The launcher names the earliest failure (whole seconds) the root cause; `after_a_peer` (this
    rank failed because another died) dates this one a second later, so a tie goes to the cause.
    Returns whether the file was written."""
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if not path:
        return False
    record = {'message': {'message': message.strip().splitlines()[-1] if message.strip() else message,
                          'extraInfo': {'py_callstack': message,
                                        'timestamp': str(int(time.time()) + int(after_a_peer))}}}
    try:
        with open(path, 'w') as f:
            json.dump(record, f)
    except OSError:
        return False
    return True


def _stop(message: str, status: int, after_a_peer: bool = False) -> NoReturn:
    if not _told_launcher_quietly(message, after_a_peer):
        # not print: util.dist silences it on ranks other than 0, and a launcher without an error
        # file (RANK / WORLD_SIZE set by a script or a cluster's operator) would show this line nowhere
        sys.stderr.write(message + '\n')
        sys.stderr.flush()
    sys.exit(status)


def _told_launcher_quietly(message: str, after_a_peer: bool = False) -> bool:
    """tell_launcher, and whether this rank may then stay silent: a rank other than 0 whose
    message reached the launcher's closing summary (written, and no restart left to hide the
    summary). Every rank usually stops on the same check, and rank 0's line says it once."""
    told = tell_launcher(message, after_a_peer)
    last_attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == os.environ.get('TORCHELASTIC_MAX_RESTARTS',
                                                                                        '0')
    return told and last_attempt and os.environ.get('RANK', '0') != '0'


def run_main(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
             resumable: bool = True) -> None:
    """An entry script's `__main__`: parses the flags and runs `main`. Ctrl-C, SIGTERM (one
    process only), a data file that cannot be decoded (raised in a DataLoader worker, whose
    traceback would bury the file's name), a full disk and a GPU out of memory end with one line
    instead of a traceback that says how to continue. Under a launcher, whatever stops a
    rank (those, an `error:` exit, a bad flag, a traceback) is also what the launcher's summary
    shows (`tell_launcher`); a rank whose collective broke because another rank died first says
    that in one line."""
    print_usage_and_exit = parser.error

    def flag_error(message: str) -> NoReturn:
        if _told_launcher_quietly(f'{parser.prog}: error: {message}'):
            sys.exit(2)
        print_usage_and_exit(message)

    def stop_interrupted(terminated: bool) -> NoReturn:
        what = 'terminated (SIGTERM)' if terminated else 'interrupted'
        _stop(f'{what}{resume_hint(args) if resumable else ""}', 143 if terminated else 130)

    parser.error = flag_error
    startup.imports_done()  # util.startup's Ctrl-C handler is for the imports only
    args = parser.parse_args()
    if os.environ.get('WORLD_SIZE', '1').strip() in ('', '1'):
        # one process only: a rank of several, blocked in a collective, could not run a Python
        # handler, so under a multi-process launcher the default (immediate exit) is kept
        signal.signal(signal.SIGTERM, _terminate_main_process(os.getpid()))
    try:
        main(args)
    except (KeyboardInterrupt, Terminated) as e:
        stop_interrupted(isinstance(e, Terminated))
    except UnreadableImage as e:
        text = str(e)  # from a worker: its whole traceback, ending with our message
        line = text[text.rfind('cannot decode'):].splitlines()[0]
        _stop(f'error: {line}; replace or remove that file{resume_hint(args) if resumable else ""}', 1)
    except SystemExit as e:  # an `error:` line (its text is the code), or a status
        if isinstance(e.code, str):
            if _told_launcher_quietly(e.code):
                sys.exit(1)  # the line is in this rank's error file, which the launcher's summary shows
        elif e.code not in (None, 0):
            tell_launcher(f'exit status {e.code}: see this rank\'s output above')
        raise
    except torch.cuda.OutOfMemoryError as e:
        _stop(out_of_memory_line(args, e, resumable), 1)
    except Exception as e:
        if _raised_in_sigterm_handler(e):
            signal.signal(signal.SIGCHLD, lambda *_: None)  # as the handler would have, had it run
            stop_interrupted(terminated=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # checkpoints are written by rename (util.checkpoint.save_atomic): the last one saved is whole
            _stop(f'error: no space left (disk or quota full) to write {e.filename or "a file"}: free some space'
                  f'{resume_hint(args) if resumable else ", then rerun"}', 1)
        lost_peer = _peer_lost(e)
        if lost_peer:
            # a consequence: the process that failed first says why (its line, or the launcher's summary of a
            # process killed without one); this one's traceback would only bury that
            _stop(f'error: stopped because another process of this run failed first ({lost_peer}); the launcher\'s '
                  f'closing summary names it{resume_hint(args) if resumable else ""}', 1, after_a_peer=True)
        tell_launcher(traceback.format_exc(), after_a_peer=any(text in str(e) for text in _PEER_FAILED))
        raise
