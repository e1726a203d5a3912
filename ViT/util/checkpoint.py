"""Checkpoints: atomic save, discovery of the newest one, safe loading, RNG state.

Format (upstream's keys): {'model', 'optimizer', 'epoch', 'scaler', 'args', ...} with the
model under 'model'. Everything is plain tensors / numbers / strings / dicts, so the file
loads with torch.load(..., weights_only=True); args are stored as a dict, not a Namespace.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util import dist

CHECKPOINT_PATTERN = re.compile(r'^checkpoint-(\d+)\.pth$')


class CheckpointError(SystemExit):
    def __init__(self, message: str):
        super().__init__('error: ' + message)


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Namespace -> dict of plain values (weights_only-loadable)."""
    plain = (str, int, float, bool, type(None))
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, plain):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def rng_state() -> dict[str, Any]:
    """RNG states of this process. numpy/python states are stored as tensors/lists so that
    weights_only loading accepts them."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': py_state[0], 'state': list(py_state[1]), 'gauss': py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'],
                         n['has_gauss'], n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# torch's zip writer reports a full disk or quota as a RuntimeError ("unexpected pos ...", no errno);
# a failed write with less than this left on the device is taken for one too
FULL_DISK_BYTES = 64 << 20


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # e.g. the folder is gone: the write's own error says more
        return None


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file then rename, so an interruption never leaves a torn file. A
    full disk is an OSError ENOSPC naming `path` (util.runtime.run_main says it in one line); the
    partial file is removed, the previous `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        free = _free_bytes(path.parent)
        full = (getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) or 'unexpected pos' in str(e)
                or (free is not None and free < FULL_DISK_BYTES))
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """save_atomic for a text file (results JSON, tables): a kill mid-write leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def keep_copy(src: str | Path, dst: str | Path) -> None:
    """dst becomes a hard link to src (no second serialisation; src is later replaced by rename,
    which leaves dst intact), or a copy where links are not supported."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + '.tmp')
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def missing_file_message(what: str, path: str | Path) -> str:
    """`what` does not exist, or is a folder where a checkpoint file was meant."""
    path = Path(path)
    if path.is_dir():
        return f'{what} is a folder, not a checkpoint file (e.g. {path / "checkpoint-last.pth"})'
    return f'{what} does not exist'


def load(path: str | Path, map_location: str | torch.device = 'cpu') -> dict[str, Any]:
    """torch.load with weights_only and a clear message for missing or unreadable files.
    Falls back to a full unpickle only for upstream checkpoints that pickled a Namespace
    (LocalMIM's released files), with a note; their 'args' come back as a dict, as ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(missing_file_message(f'checkpoint {path}', path))
    if path.stat().st_size == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes): an interrupted copy?')
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as first_error:  # noqa: BLE001 - re-raised below with context
        message = str(first_error)
        if 'Weights only load failed' in message and 'argparse' in message.lower():
            print(f'note: {path} holds a pickled argparse.Namespace (upstream format); '
                  'loading it with weights_only=False because it is an upstream checkpoint')
            try:
                obj = torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e:  # noqa: BLE001
                first_error = e
            else:
                if isinstance(obj, dict) and isinstance(obj.get('args'), argparse.Namespace):
                    obj['args'] = vars(obj['args'])  # callers read args as this project saves them
                return obj
        first_line = (str(first_error).splitlines() or [''])[0]
        try:
            with open(path, 'rb') as f:
                head = f.read(2)
        except OSError as e:
            raise CheckpointError(f'cannot read checkpoint {path}: {e.strerror or e}') from None
        if not (head == b'PK' or head[:1] == b'\x80'):  # torch.save writes a zip, or a pickle (legacy)
            detail = 'not a file written by torch.save'
        elif 'Weights only load failed' in message:
            detail = 'it pickles Python objects other than tensors and containers'
        else:
            detail = f'{type(first_error).__name__}: {first_line}'
        raise CheckpointError(f'cannot read checkpoint {path} (not a checkpoint of these scripts, or damaged): '
                              f'{detail}') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a checkpoint dict '
                              f'(with "model", "epoch", ...)')
    return obj


def state_dict_mismatch(error: RuntimeError) -> str:
    """The informative line of load_state_dict's error (its first line only names the class)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines or [''])[0]


def upstream_groups_reordered(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of a checkpoint saved by upstream LocalMIM (timm's add_weight_decay:
    groups [no decay, decay], no 'param_names'), renumbered for a plain run here, whose groups
    are [decay, no decay] and name their parameters. Upstream numbered its parameters in its
    model's order, which its checkpoint's 'model' keys keep; each moment's shape is checked
    against the parameter it lands on. Any other state is returned as it is."""
    saved = ckpt['optimizer']
    groups, ours = saved.get('param_groups', []), optimizer.param_groups
    if (len(groups) != 2 or len(ours) != 2 or any('param_names' in g for g in groups)
            or any('param_names' not in g for g in ours) or not isinstance(ckpt.get('model'), dict)
            or groups[0].get('weight_decay') != 0 or not groups[1].get('weight_decay')
            or not ours[0]['weight_decay'] or ours[1]['weight_decay'] != 0
            or [len(g['params']) for g in groups] != [len(ours[1]['params']), len(ours[0]['params'])]):
        return saved
    decay, no_decay = set(ours[0]['param_names']), set(ours[1]['param_names'])
    in_model_order = [k for k in ckpt['model'] if k in decay or k in no_decay]
    upstream_names = [k for k in in_model_order if k in no_decay] + [k for k in in_model_order if k in decay]
    ours_names = ours[0]['param_names'] + ours[1]['param_names']
    if sorted(upstream_names) != sorted(ours_names):
        return saved
    our_index = {name: i for i, name in enumerate(ours_names)}
    new_index = {old: our_index[name] for old, name in enumerate(upstream_names)}
    params = [p for g in ours for p in g['params']]
    state = {new_index[i]: v for i, v in saved['state'].items()}
    if any(torch.is_tensor(v.get('exp_avg')) and v['exp_avg'].shape != params[i].shape for i, v in state.items()):
        return saved
    print('note: optimizer state saved by upstream LocalMIM (weight-decay groups in the other order): renumbered')
    implementation = ('fused', 'foreach', 'capturable', 'differentiable')  # this run's, not the saving torch's
    new_groups = []
    for g, mine in zip((groups[1], groups[0]), ours):
        # load_state_dict pairs a saved group's indices with our group's parameters by position
        group = {**g, 'params': [our_index[n] for n in mine['param_names']]}
        group.update({k: mine[k] for k in implementation if k in mine})
        new_groups.append(group)
    return {'state': state, 'param_groups': new_groups}


def restore_training_state(ckpt: dict[str, Any], path: str | Path, optimizer: torch.optim.Optimizer,
                           loss_scaler, groups_hint: str) -> None:
    """Optimizer, loss-scaler and this rank's RNG state from a loaded checkpoint. An optimizer
    state saved for other parameter groups stops the run with `groups_hint` (what differs and
    what to do); a checkpoint from another number of processes restarts the RNG streams."""
    if 'optimizer' in ckpt:
        try:
            optimizer.load_state_dict(upstream_groups_reordered(ckpt, optimizer))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f'the optimizer state in {path} was saved for other parameter groups '
                                  f'({e}): {groups_hint}') from None
    if loss_scaler is not None and ckpt.get('scaler'):
        loss_scaler.load_state_dict(ckpt['scaler'])
    rng, world = ckpt.get('rng'), dist.get_world_size()
    if rng is not None and len(rng) == world:
        set_rng_state(rng[dist.get_rank()])
    elif rng is not None:
        print(f'note: checkpoint saved with {len(rng)} processes, now {world}: RNG streams restart')


def find_resume_checkpoint(args: argparse.Namespace) -> Path | None:
    """--resume, else (with auto-resume) the newest readable checkpoint-<N>.pth or checkpoint-last.pth
    in --output_dir, else None."""
    if args.resume:
        return Path(args.resume)
    if not getattr(args, 'auto_resume', False) or not args.output_dir:
        return None
    return dist.on_main(lambda: newest_checkpoint(args.output_dir))  # ranks never resume from different files


def newest_checkpoint(output_dir: str | Path, resuming: bool = True) -> Path | None:
    """The readable checkpoint of the highest epoch among checkpoint-<N>.pth and
    checkpoint-last.pth (the latter on a tie), or None when there are none. Unreadable ones (a
    bad copy, a full disk) are passed over, newest first, with a note when `resuming`; when
    none can be read, the newest one's read error stops the run rather than a fresh start."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    # (epoch, is last, path), the epoch of a numbered file from its name until it is read
    candidates = [(int(m.group(1)), False, p) for p in folder.iterdir()
                  if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_file()]
    last = folder / 'checkpoint-last.pth'
    skipped: list[CheckpointError] = []
    if last.is_file():
        try:
            candidates.append((saved_epoch(last), True, last))
        except CheckpointError as e:
            skipped.append(e)
    for _, _, path in sorted(candidates, reverse=True):
        try:
            if path is not last:
                saved_epoch(path)  # readable? (memory-mapped: the tensors are not loaded)
        except (KeyError, TypeError, ValueError):
            pass  # readable, without an epoch of its own: the resume reports what it lacks
        except CheckpointError as e:
            skipped.append(e)
            continue
        if resuming:
            for e in skipped:
                problem = str(e.code).removeprefix('error: ').rstrip('.')
                print(f'note: {problem}; resuming from {path} instead')
        return path
    if skipped:
        raise skipped[0]
    return None


def saved_epoch(path: Path) -> int:
    """The epoch a checkpoint holds; CheckpointError when it cannot be read."""
    try:  # memory-mapped: reads the epoch without loading the tensors
        return int(torch.load(path, map_location='cpu', weights_only=True, mmap=True)['epoch'])
    except Exception:  # noqa: BLE001 - unreadable: let load() report it with a clear message
        return int(load(path)['epoch'])


def changed_flags(saved_args: dict | None, args: argparse.Namespace, keys: tuple[str, ...]) -> list[str]:
    """'--flag value (checkpoint: saved value)' for each flag among `keys` that differs (paths as
    normalised: `data/` is `data`)."""
    saved_args = saved_args or {}

    def same(key: str, saved: Any, now: Any) -> bool:
        if key.endswith('_path') and isinstance(saved, str) and isinstance(now, str):
            return os.path.normpath(os.path.expanduser(saved)) == os.path.normpath(os.path.expanduser(now))
        return saved == now
    return [f'--{k} {getattr(args, k)} (checkpoint: {saved_args[k]})' for k in keys
            if k in saved_args and hasattr(args, k) and not same(k, saved_args[k], getattr(args, k))]


def note_changed_flags(path: Path, saved_args: dict | None, args: argparse.Namespace, keys: tuple[str, ...]) -> None:
    """Prints the flags among `keys` whose value differs from the checkpointed run's (a resumed
    run follows the new values: e.g. another --epochs stretches the lr schedule mid-run)."""
    changed = changed_flags(saved_args, args, keys)
    if changed:
        print(f'note: resuming {path} with flags that differ from its run: {", ".join(changed)}')


# folder -> its open lock file, held until the process ends (the OS then releases the lock)
_held_locks: dict[str, Any] = {}


def _drop_inherited_locks() -> None:
    """In a forked child (a data-loader worker): close the inherited lock files. A flock lasts while
    any copy of its descriptor is open, so without this a run killed with SIGKILL kept its folder
    locked until its workers noticed and exited, seconds later. Closing a copy does not unlock."""
    for handle in _held_locks.values():
        handle.close()
    _held_locks.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_run_folder(*folders: str | None) -> None:
    """Every rank: stops (all ranks together) when another live process trains into one of
    `folders` (--output_dir, and --log_dir when it differs), e.g. the same command started twice,
    whose checkpoints and logs would interleave. Rank 0 holds an exclusive flock on
    <folder>/.run.lock, released when it exits, however it exits; a file system without locks is
    not checked."""
    unique = list(dict.fromkeys(str(Path(f).resolve()) for f in folders if f))

    def lock_all() -> None:
        for folder in unique:
            problem = _lock(folder)
            if problem:
                raise SystemExit(problem)
    dist.on_main(lock_all)


def _lock(folder: str) -> str | None:
    """Takes <folder>/.run.lock for this process; the error message when another holds it."""
    if folder in _held_locks:  # a second run in this process (e.g. after an in-process interruption)
        return None
    try:
        import fcntl
        handle = open(Path(folder) / '.run.lock', 'a+')
    except (ImportError, OSError):  # no fcntl (Windows), or the folder is not writable (reported later)
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or 'another process'
        handle.close()
        return (f'error: another run is training into {folder} ({holder}); wait for it or stop it, '
                f'or use another --output_dir / --log_dir')
    except OSError:  # no locking on this file system: not checked
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    handle.flush()
    _held_locks[folder] = handle
    return None


def first_missing_folder(folder: str | Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist yet (what creating it makes)."""
    missing = [p for p in (Path(folder).resolve(), *Path(folder).resolve().parents) if not p.exists()]
    return missing[-1] if missing else None


def remove_if_unused(folder: str | Path, made_from: Path, pid: int) -> None:
    """At the exit of process `pid`, which made `folder` (and its parents up to `made_from`) for
    its run: removes them again when the run left nothing there but its lock, as a run does that
    stops on a bad flag, checkpoint or data folder before writing anything."""
    folder = Path(folder).resolve()
    if os.getpid() != pid or not folder.is_dir():  # a forked child exiting, or removed already
        return
    try:
        if any(entry.name != '.run.lock' for entry in folder.iterdir()):
            return
        handle = _held_locks.pop(str(folder), None)
        if handle is not None:
            handle.close()
        (folder / '.run.lock').unlink(missing_ok=True)
        for path in (folder, *folder.parents):
            path.rmdir()  # an OSError once a folder is not empty (or not ours to remove) ends the walk
            if path == made_from:
                break
    except OSError:
        pass


def continues_folder(output_dir: str | None, resumed_from: str | Path | None) -> bool:
    """Whether a run resumed from `resumed_from` continues --output_dir's own run (the checkpoint is in it)."""
    return bool(output_dir and resumed_from is not None
                and Path(resumed_from).resolve().parent == Path(output_dir).resolve())


def start_run_folder(output_dir: str | None, log_dir: str | None, start_epoch: int, resumed_from: Path | None,
                     keep: tuple = ()) -> bool:
    """Every rank, once a training script knows where its run starts, before it writes anything.
    Returns whether the run continues this folder's own run (resumed from a checkpoint in it),
    for the tensorboard writer's purge.

    Continuing: what the folder holds past the resume point (log.txt lines of epochs from
    `start_epoch` on, trained after the checkpoint before an interruption; checkpoints of later
    epochs, checkpoint-best.pth included, after an explicit --resume of an older one) is set
    aside, as the run redoes it.
    Otherwise (a fresh run, or one resumed from another folder's checkpoint) the folder's
    earlier checkpoints, log.txt, freezeout_schedule.json and tensorboard files are set aside, so a later auto-resume
    cannot pick the earlier run's checkpoint-<N>.pth and the runs' lines never mix. Set aside
    means moved to previous-<time>/ beside them; nothing is deleted, and no path in `keep` (the
    checkpoint resumed from, the --finetune encoder) is moved."""
    continues = continues_folder(output_dir, resumed_from)
    if dist.is_dist():  # no rank may still be reading a file that rank 0 moves
        torch.distributed.barrier()
    if not output_dir or not dist.is_main_process():
        return continues
    out = Path(output_dir)
    kept = {Path(k).resolve() for k in keep if k}
    if continues:
        later = [p for p in out.glob('checkpoint-*.pth')
                 if (m := CHECKPOINT_PATTERN.match(p.name)) and int(m.group(1)) >= start_epoch]
        for named in (out / 'checkpoint-last.pth', out / 'checkpoint-best.pth'):  # of later epochs too
            try:
                if named.is_file() and named.resolve() not in kept and saved_epoch(named) >= start_epoch:
                    later.append(named)
            except (CheckpointError, KeyError, ValueError):  # unreadable: leave it where it is
                pass
        aside = [p for p in later if p.resolve() not in kept]
        kept_lines, dropped = _split_log(out / 'log.txt', start_epoch)
    else:
        aside = [p for p in out.iterdir() if (CHECKPOINT_PATTERN.match(p.name) or p.name in (
                 'checkpoint-last.pth', 'checkpoint-best.pth', 'log.txt', 'freezeout_schedule.json'))
                 and p.resolve() not in kept] if out.is_dir() else []
        events = Path(log_dir or output_dir)
        aside += list(events.glob('events.out.tfevents.*')) if events.is_dir() else []
        kept_lines, dropped = '', ''
    if not aside and not dropped:
        return continues
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    folders: dict[Path, Path] = {}

    def folder_in(parent: Path) -> Path:  # a new previous-<time>[-n]/ per parent folder, never reused
        if parent not in folders:
            n = 0
            while (parent / (f'previous-{stamp}' + (f'-{n}' if n else ''))).exists():
                n += 1
            folders[parent] = parent / (f'previous-{stamp}' + (f'-{n}' if n else ''))
            folders[parent].mkdir()
        return folders[parent]
    for path in aside:
        os.replace(path, folder_in(path.parent) / path.name)
    if dropped:  # the set-aside copy first: an interruption here loses no line
        (folder_in(out) / 'log.txt').write_text(dropped, encoding='utf-8')
        write_text_atomic(out / 'log.txt', kept_lines)
    why = 'this run redoes them' if continues else 'this run starts afresh'
    for parent, folder in folders.items():
        what = sorted(p.name for p in aside if p.parent == parent)
        what += [f'log.txt lines of epochs >= {start_epoch}'] if dropped and parent == out else []
        print(f'note: {parent} held {", ".join(what[:4])}{", ..." if len(what) > 4 else ""} of an earlier run; '
              f'{why}, so they were moved to {folder}/')
    return continues


def _split_log(log: Path, start_epoch: int) -> tuple[str, str]:
    """log.txt's text split in (lines of epochs before `start_epoch` and lines without an epoch,
    e.g. --eval results; lines of epochs from `start_epoch` on)."""
    if not log.is_file():
        return '', ''
    lines = log.read_text(encoding='utf-8').splitlines(keepends=True)
    is_later = [(epoch := _epoch_of(line)) is not None and epoch >= start_epoch for line in lines]
    return (''.join(line for line, later in zip(lines, is_later) if not later),
            ''.join(line for line, later in zip(lines, is_later) if later))


def _epoch_of(line: str) -> int | None:
    """The epoch of a log.txt line, None for lines without one (e.g. --eval results)."""
    try:
        epoch = json.loads(line).get('epoch')
    except (json.JSONDecodeError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


def checkpoint_state(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     loss_scaler, epoch: int, rng_states: list, extra: dict[str, Any] | None = None) -> dict:
    """What a checkpoint file holds (upstream's keys, plus every rank's RNG state)."""
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
            'scaler': loss_scaler.state_dict() if loss_scaler is not None else None,
            'args': args_to_dict(args), 'rng': rng_states, **(extra or {})}


def save_checkpoint(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    loss_scaler, epoch: int, extra: dict[str, Any] | None = None) -> bool:
    """checkpoint-last.pth every --save_last_freq epochs, checkpoint-<epoch>.pth every --save_freq,
    both at the end. RNG states of all ranks are gathered so each rank resumes its own stream.
    Rank 0 writes. `extra`: more top-level entries (pretraining records its frozen set).
    Returns whether this epoch was saved (the same answer on every rank)."""
    keep = epoch % args.save_freq == 0 or epoch + 1 == args.epochs
    if not keep and (epoch + 1) % args.save_last_freq:
        return False  # the same decision on every rank: none enters the gather below
    states = [rng_state()]
    if dist.is_dist():
        gathered = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(gathered, states[0])
        states = gathered
    if not args.output_dir or not dist.is_main_process():
        return True
    out = Path(args.output_dir)
    save_atomic(checkpoint_state(args, model, optimizer, loss_scaler, epoch, states, extra),
                out / 'checkpoint-last.pth')
    if keep:
        keep_copy(out / 'checkpoint-last.pth', out / f'checkpoint-{epoch}.pth')
    return True
