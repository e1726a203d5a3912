"""Small-scale FreezeOut study: pretraining time saved vs representation quality.

    python study.py --data_path ../../shared/data/imagenette-128        # on one GPU
    python study.py --quick --device cpu --data_path <small ImageFolder>  # smoke run (tests)

LocalMIM pretraining of a small ViT (patch 16 at 128 px: an 8x8 grid, all four scales) under
plain LocalMIM and FreezeOut (cubic t_0 0.8, linear t_0 0.5, each with and without lr
scaling), then `--decoder_freeze never` for the best FreezeOut config; regular and the best
config again with a second seed. Every encoder is scored on val by 20-NN and a linear
classifier on its frozen features (one feature pass; --full_linprobe for MAE's augmented
linear probe); regular and the best config also by a short fine-tune. Each run is recorded (wall time, images/s,
the FLOP estimate, accuracies, device) in a results JSON that later invocations extend (runs
already there are skipped unless --rerun), rendered as a markdown table and a plot. Runs go in
order of importance; --max_minutes stops before a run that would not finish in time, so a
study can be spread over several GPU sessions by repeating the same command. A run that fails is
reported and left out, the others go on, and the study exits with an error listing the failures; an
image that cannot be decoded stops the study at once (every run would fail on it). Each run is
`python <script>` with this interpreter, or the command in $VIT_PYTHON (split on spaces), e.g.
VIT_PYTHON='numactl --cpunodebind=0 python3'.
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from util import flops  # noqa: E402
from util.cli import USABLE_CPUS, ArgumentParser, check_output_folder, python_command  # noqa: E402
from util.flags import BACKENDS  # noqa: E402

FREEZEOUT_CONFIGS = {
    'cubic0.8': ['--how_scale', 'cubic', '--t_0', '0.8'],
    'cubic0.8-noscale': ['--how_scale', 'cubic', '--t_0', '0.8', '--no_scale_lr'],
    'linear0.5': ['--how_scale', 'linear', '--t_0', '0.5'],
    'linear0.5-noscale': ['--how_scale', 'linear', '--t_0', '0.5', '--no_scale_lr'],
}


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument('--data_path', default=str(ROOT.parent / 'shared' / 'data' / 'imagenette-128'),
                   help='ImageFolder with train/ and val/ (default: shared/data/imagenette-128 beside the '
                        'repository, from whichever folder the study runs)')
    p.add_argument('--out', default=None, help='run folders (checkpoints, logs; default: study_out/ at the '
                                               'repository root, study_out/quick/ with --quick)')
    p.add_argument('--results', default=None,
                   help='results JSON, extended by every invocation; the table and plot go beside it '
                        '(default: image/study_results.json at the repository root; with --quick, '
                        'study_results.json in --out)')
    p.add_argument('--model', default='MIM_vit_small_patch16', help='pretraining model (run_pretrain.py --model)')
    p.add_argument('--input_size', default=128, type=int, help='image side of every run')
    p.add_argument('--epochs', default=40, type=int, help='pretraining epochs')
    p.add_argument('--warmup_epochs', default=4, type=int, help='pretraining lr warmup epochs')
    p.add_argument('--batch_size', default=512, type=int,
                   help='pretraining batch (scoring uses at most 256); at 128 px the step is bound by kernel '
                        'launches, so 512 should cost about what 256 does per step (README, study section)')
    p.add_argument('--blr', default=1.5e-4, type=float, help='pretraining base lr (lr = blr * batch / 256)')
    p.add_argument('--linprobe_epochs', default=20, type=int, help='epochs of the linear classifier')
    p.add_argument('--full_linprobe', action='store_true',
                   help='linear probe by run_linprobe.py (augmented images every epoch, MAE\'s protocol) instead '
                        'of a linear classifier on frozen, unaugmented features (much faster)')
    p.add_argument('--finetune_epochs', default=15, type=int, help='epochs of each fine-tune')
    p.add_argument('--finetune_batch_size', default=256, type=int,
                   help='batch of each fine-tune (lr = 1e-3 * batch / 256); its step is launch-bound too, so '
                        '256 takes about half the time of 128')
    p.add_argument('--seeds', default=[0, 1], type=int, nargs=2, metavar=('FIRST', 'SECOND'),
                   help='seed of every config, and the second seed for regular and the best config')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--data_backend', default=None, choices=list(BACKENDS),
                   help='pretraining input backend (default: gpu-cache on a GPU, pil on CPU)')
    p.add_argument('--num_workers', default=max(1, min(15, USABLE_CPUS - 1)), type=int,
                   help='DataLoader workers of every run (default: the usable CPUs less one, at most 15, here '
                        f'{max(1, min(15, USABLE_CPUS - 1))}): the fine-tunes\' CPU RandAugment (2.3 ms an image '
                        'at 128 px on a core of the 2-core development VM) can bound their step')
    p.add_argument('--rerun', action='store_true', help='run again configs already in the results JSON')
    p.add_argument('--no_finetune', action='store_true', help='skip the fine-tuning runs')
    p.add_argument('--max_minutes', default=None, type=float,
                   help='start no run that would end after this many minutes (judged by the longest run so '
                        'far); what is done stays in the results JSON, and the same command continues later')
    p.add_argument('--quick', action='store_true',
                   help='tiny model, 32 px, 2 epochs, small batches, and two of the four FreezeOut configs '
                        f'({" and ".join(QUICK_CONFIGS)}): a smoke run of every step on CPU in a few minutes; '
                        'results go to <repo>/study_out/quick/ (or beside --out), never to image/')
    return p


QUICK_CONFIGS = ['cubic0.8', 'linear0.5-noscale']


def apply_quick(args: argparse.Namespace, defaults: argparse.Namespace) -> None:
    """Every step of the study, at toy size: tiny ViT at 32 px, 2 epochs, two FreezeOut configs.
    A note names the flags given that it overrides."""
    before = vars(args).copy()
    args.model, args.input_size, args.epochs, args.warmup_epochs = 'MIM_vit_tiny_patch16', 32, 2, 0
    args.batch_size, args.linprobe_epochs, args.finetune_epochs, args.num_workers = 8, 1, 1, 0
    args.finetune_batch_size = 8
    args.blr = 1.5e-2  # lr 4.7e-4 at batch 8: the encoders move enough in 24 steps for the configs to differ
    overridden = [f'--{k} {before[k]}' for k, v in vars(args).items()
                  if before[k] != v and before[k] != getattr(defaults, k)]
    if overridden:
        print(f'note: --quick sets its own values in place of {", ".join(overridden)}')


def device_name(device: str) -> str:
    import torch
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(0)
    return 'cpu'


class RunFailed(Exception):
    """A script of the study exited with an error; the message ends with its log's last lines."""


@contextlib.contextmanager
def reading(log: Path):
    """Reading a run's log.txt: a missing, empty or cut-off file fails that run (RunFailed),
    not the whole study."""
    try:
        yield
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError) as e:
        raise RunFailed(f'its log {log} could not be read ({type(e).__name__}: {e})') from None


class UnreadableData(Exception):
    """A script stopped on an image it cannot decode (its `error: cannot decode <file>: ...` line):
    every run of the study reads that file, so the study stops rather than fail each run in turn."""


ECHO_EVERY_S = 30.0  # a run's progress lines on the console: at most one per this many seconds


def is_progress_line(line: str) -> bool:
    """A line worth echoing from a run's log: an epoch's end (pretraining) or its val accuracy (fine-tuning)."""
    return (line.startswith('Epoch [') and ' done in ' in line) or line.startswith('Accuracy of the network')


def run(cmd: list[str], log: Path) -> float:
    """Runs a script from ViT/, its output appended to `log` (and a progress line on the console at most
    every ECHO_EVERY_S seconds); returns the wall time."""
    print(f'$ {" ".join(cmd)}\n  (output: {log})', flush=True)
    start = last_echo = time.perf_counter()
    with open(log, 'a', buffering=1) as f:  # line-buffered: `tail -f` on the log follows the run
        written_before = f.tell()  # the log holds earlier runs' output too
        with subprocess.Popen([*python_command(), *cmd], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors='replace', env={**os.environ, 'PYTHONUNBUFFERED': '1'}) as proc:
            try:
                for line in proc.stdout:
                    f.write(line)
                    if is_progress_line(line) and time.perf_counter() - last_echo >= ECHO_EVERY_S:
                        print('  ' + line.rstrip(), flush=True)
                        last_echo = time.perf_counter()
            except BaseException:  # Ctrl-C reaching only the study, or a failed write: the run stops too
                proc.kill()
                raise
    if proc.returncode != 0:
        with open(log, encoding='utf-8', errors='replace') as f:
            f.seek(written_before)
            this_run = f.read().splitlines()
        unreadable = next((line for line in this_run if line.startswith('error: cannot decode ')), None)
        if unreadable:  # without the script's own advice (util.runtime.run_main's): the study gives its own
            unreadable = unreadable.split('; replace or remove that file')[0]
            raise UnreadableData(f'{unreadable} (stopped {cmd[0]}; its log: {log})')
        tail = log.read_text().splitlines()[-15:]
        raise RunFailed(f'{cmd[0]} failed (exit {proc.returncode}); last lines of {log}:\n' + '\n'.join(tail))
    return time.perf_counter() - start


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class OutOfTime(Exception):
    """--max_minutes would be passed by the next run."""


# what makes recorded runs comparable with the ones a new invocation adds
SETUP_KEYS = ('model', 'input_size', 'epochs', 'warmup_epochs', 'batch_size', 'blr', 'data_backend',
              'linprobe_epochs', 'full_linprobe', 'finetune_epochs', 'finetune_batch_size')


def load_results(path: Path) -> dict:
    """The results JSON that this study extends ({'runs': {}} when there is none yet)."""
    if not path.is_file():
        return {'runs': {}}
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f'error: cannot read the results file {path}: {e}') from None
    if not isinstance(results, dict) or not isinstance(results.get('runs'), dict):
        raise SystemExit(f'error: {path} is not a study results file (a JSON object with "runs"); '
                         f'give another --results')
    return results


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.perf_counter()
        self.out = Path(args.out)
        self.results_path = Path(args.results)
        self.results = load_results(self.results_path)
        self.device = args.device
        for key, r in self.results['runs'].items():
            r = {'finetune_batch_size': min(r.get('batch_size', 128), 128), **r}  # recorded before the flag
            differ = [f'{k} {r[k]} there, {getattr(args, k)} here' for k in SETUP_KEYS
                      if k in r and r[k] != getattr(args, k)]
            if differ:
                raise SystemExit(f'error: {self.results_path} holds {key} of another setup ({"; ".join(differ)}); '
                                 f'use the same flags, or another --results')
        # the longest run (pretraining + evaluation, or a fine-tune) on this card, for --max_minutes
        card = device_name(args.device)
        self.longest_run = max([r.get('pretrain_wall_s', 0) + r.get('eval_wall_s', 0)
                                for r in self.results['runs'].values() if r.get('device') == card] +
                               [r.get('finetune_wall_s', 0)
                                for r in self.results['runs'].values() if r.get('device') == card] + [0.0])
        self.failures: list[str] = []  # this invocation's failed runs; the JSON keeps only finished ones
        self.encoder = args.model.replace('MIM_', '')
        # scoring keeps batch 256 (its probe's lr and steps follow the batch) whatever the pretraining batch
        self.eval_batch = min(args.batch_size, 256)
        self.common = ['--device', args.device, '--input_size', str(args.input_size),
                       '--data_path', args.data_path, '--num_workers', str(args.num_workers)]

    def check_time(self, what: str, runs: int = 1) -> None:
        """Raises OutOfTime if `what` (`runs` runs, each taking as long as the longest so far, this
        invocation's or recorded on this card) would end after --max_minutes."""
        if self.args.max_minutes is None:
            return
        elapsed = time.perf_counter() - self.start
        if elapsed + runs * self.longest_run > 60 * self.args.max_minutes:
            raise OutOfTime(f'{what} not started: {elapsed / 60:.1f} min spent, the longest run took '
                            f'{self.longest_run / 60:.1f} min, --max_minutes {self.args.max_minutes:g}')

    def fail(self, what: str, error: RunFailed) -> None:
        """A run that failed is reported and left out; the study goes on with the others, and the
        next invocation of the same command tries it again."""
        self.failures.append(f'{what}: {error}')
        print(f'FAILED {what}: {error}\n(the study goes on without it)', flush=True)

    def save(self) -> None:
        from util.checkpoint import write_text_atomic  # imports torch: not before the flags are parsed
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.results_path, json.dumps(self.results, indent=1))
        render(self.results, self.results_path.parent)

    def run_pretraining(self, config: str, flags: list[str], seed: int) -> tuple[Path, float, list[dict]]:
        """One pretraining into a fresh folder: (checkpoint, wall seconds, log.txt's epoch lines)."""
        a = self.args
        folder = self.out / config.replace('/', '_') / f'seed{seed}'
        pre = folder / 'pretrain'
        shutil.rmtree(pre, ignore_errors=True)  # log.txt is appended to: an earlier attempt's lines would count
        folder.mkdir(parents=True, exist_ok=True)
        cmd = ['run_pretrain.py', '--model', a.model, '--epochs', str(a.epochs), '--warmup_epochs',
               str(a.warmup_epochs), '--batch_size', str(a.batch_size), '--blr', str(a.blr), '--seed', str(seed),
               '--output_dir', str(pre), '--no_auto_resume', '--save_freq', str(a.epochs),
               # checkpoints of ~100s of MB every few-second epoch would cost more than the epochs
               '--save_last_freq', str(a.epochs), '--print_freq', '1000',
               '--data_backend', a.data_backend, *self.common, *flags]
        wall = run(cmd, folder / 'study_log.txt')
        with reading(pre / 'log.txt'):
            epochs = json_lines(pre / 'log.txt')
        return pre / f'checkpoint-{a.epochs - 1}.pth', wall, epochs

    def pretrain(self, config: str, flags: list[str], seed: int) -> dict | None:
        """Pretrain + kNN + linear probe for one config and seed; recorded and saved at once."""
        key = f'{config}/seed{seed}'
        if key in self.results['runs'] and not self.args.rerun:
            print(f'{key}: in {self.results_path}, skipped (--rerun to redo)')
            return self.results['runs'][key]
        self.check_time(f'pretraining {key}')
        try:
            return self.pretrain_and_score(key, config, flags, seed)
        except RunFailed as e:
            self.fail(f'pretraining or scoring {key}', e)
        return None

    def pretrain_and_score(self, key: str, config: str, flags: list[str], seed: int) -> dict:
        a = self.args
        ckpt, wall, epochs = self.run_pretraining(config, flags, seed)
        folder = ckpt.parents[1]
        log = folder / 'study_log.txt'
        with reading(folder / 'pretrain' / 'log.txt'):
            train_time = sum(e['train_epoch_time'] for e in epochs)
            data_wait = sum(e['train_data_wait_s'] for e in epochs)
            images = sum(e['train_images_per_s'] * e['train_epoch_time'] for e in epochs)
            img_per_s = images / train_time  # over the run: later FreezeOut epochs are faster
            # train_loss sums the live taps only, so it falls when FreezeOut drops one: compare runs by
            # the per-scale terms (a dropped tap has none)
            final_loss = epochs[-1]['train_loss']
            final_scales = {k[len('train_loss_scale'):]: v for k, v in epochs[-1].items()
                            if k.startswith('train_loss_scale')}
        record = {**{k: getattr(a, k) for k in SETUP_KEYS},
                  'config': config, 'seed': seed, 'flags': flags, 'device': device_name(self.device),
                  'host': socket.gethostname(),
                  'pretrain_wall_s': wall, 'pretrain_train_s': train_time, 'pretrain_data_wait_s': data_wait,
                  'pretrain_img_per_s': img_per_s,
                  'final_loss': final_loss, 'final_loss_by_scale': final_scales,
                  'flops_saving_estimate': self.flops_saving(flags),
                  'checkpoint': str(ckpt), 'date': datetime.date.today().isoformat()}
        for sub in ('knn', 'linprobe'):  # their log.txt files are appended to as well
            shutil.rmtree(folder / sub, ignore_errors=True)
        # one feature pass gives the 20-NN accuracy and the linear classifier on frozen features
        eval_start = time.perf_counter()
        run(['run_knn.py', '--model', self.encoder, '--finetune', str(ckpt), '--output_dir', str(folder / 'knn'),
             '--batch_size', str(self.eval_batch), '--linear_epochs', str(a.linprobe_epochs), *self.common], log)
        with reading(folder / 'knn' / 'log.txt'):
            results = {r['mode']: r for r in json_lines(folder / 'knn' / 'log.txt')}
            record['knn_top1'], record['linprobe_top1'] = results['knn']['acc1'], results['linear']['acc1']
        record['linprobe_protocol'] = 'frozen features, no augmentation (run_knn.py --linear_epochs)'
        if a.full_linprobe:  # MAE's protocol: augmented images through the frozen encoder every epoch
            run(['run_linprobe.py', '--model', self.encoder, '--finetune', str(ckpt), '--output_dir',
                 str(folder / 'linprobe'), '--epochs', str(a.linprobe_epochs), '--warmup_epochs', '1',
                 '--batch_size', str(self.eval_batch), '--no_auto_resume', '--print_freq', '1000', *self.common], log)
            with reading(folder / 'linprobe' / 'log.txt'):
                record['linprobe_top1'] = json_lines(folder / 'linprobe' / 'log.txt')[-1]['max_accuracy']
            record['linprobe_protocol'] = 'run_linprobe.py (augmented, MAE)'
        record['eval_wall_s'] = time.perf_counter() - eval_start
        self.longest_run = max(self.longest_run, wall + record['eval_wall_s'])
        self.results['runs'][key] = record
        self.save()
        print(f'{key}: pretrain {train_time:.0f}s, kNN {record["knn_top1"]:.1f}%, '
              f'linear {record["linprobe_top1"]:.1f}%', flush=True)
        return record

    def finetune(self, key: str) -> None:
        record = self.results['runs'].get(key)
        if record is None:  # its pretraining failed (reported)
            return
        if 'finetune_top1' in record and not self.args.rerun:
            return
        try:
            self.pretrain_again_and_finetune(key, record)
        except RunFailed as e:
            self.fail(f'fine-tuning {key}', e)

    def pretrain_again_and_finetune(self, key: str, record: dict) -> None:
        if not Path(record['checkpoint']).is_file():  # recorded by an earlier session, on another machine
            print(f'{key}: checkpoint {record["checkpoint"]} is gone; pretraining it again to fine-tune it')
            self.check_time(f'pretraining {key} again and fine-tuning it', runs=2)
            # the scored record (its times, card and accuracies) stays; only the encoder is new
            ckpt, _, _ = self.run_pretraining(record['config'], record['flags'], record['seed'])
            record['checkpoint'] = str(ckpt)
            encoder_note = (f'pretrained again with the same flags and seed on {device_name(self.device)}, '
                            f'{datetime.date.today().isoformat()}')
        else:
            encoder_note = None
        self.check_time(f'fine-tuning {key}')
        a = self.args
        folder = Path(record['checkpoint']).parents[1]
        shutil.rmtree(folder / 'finetune', ignore_errors=True)
        wall = run(['run_finetune.py', '--model', self.encoder, '--finetune', record['checkpoint'],
             '--output_dir', str(folder / 'finetune'), '--epochs', str(a.finetune_epochs),
             '--warmup_epochs', '1', '--batch_size', str(a.finetune_batch_size), '--blr', '1e-3',
             '--layer_decay', '0.75', '--no_auto_resume', '--print_freq', '1000', *self.common],
            folder / 'study_log.txt')
        with reading(folder / 'finetune' / 'log.txt'):
            epochs = json_lines(folder / 'finetune' / 'log.txt')
            record['finetune_top1'] = epochs[-1]['max_accuracy']
            # where a fine-tune's time goes: its training loops (evaluations aside), and rank 0's wait
            # for input in them (CPU RandAugment) against the wall time of the whole run
            record['finetune_train_s'] = sum(e['train_epoch_time'] for e in epochs)
            record['finetune_data_wait_s'] = sum(e['train_data_wait_s'] for e in epochs)
        record['finetune_wall_s'] = wall
        if encoder_note:  # set only now: a fine-tune that fails leaves the record as it was
            record['finetuned_encoder'] = encoder_note
        self.longest_run = max(self.longest_run, wall)
        self.save()
        print(f'{key}: fine-tune {record["finetune_top1"]:.1f}% top-1 ({len(epochs)} epoch{"s" * (len(epochs) != 1)}, '
              f'{wall:.0f}s)', flush=True)

    def flops_saving(self, flags: list[str]) -> float:
        if '--t_0' not in flags:
            return 0.0
        shape = dataclasses.replace(flops.SHAPES[self.args.model], img_size=self.args.input_size)
        t_0 = float(flags[flags.index('--t_0') + 1])
        how = flags[flags.index('--how_scale') + 1]
        mode = flags[flags.index('--decoder_freeze') + 1] if '--decoder_freeze' in flags else 'tap'
        return flops.freezeout_speedup(shape, t_0, how, mode)['saving']


def regular_baseline(runs: list[dict], r: dict) -> float | None:
    """Mean pretraining loop time of the regular runs to compare `r` with: those on the same
    host when there are any (the launch-bound step at 128 px depends on the host CPU too), else
    those on the same card (a study may span several leases)."""
    regular = [x for x in runs if x['config'] == 'regular' and x['device'] == r['device']]
    same_host = [x for x in regular if r.get('host') is not None and x.get('host') == r.get('host')]
    pool = same_host or regular
    return sum(x['pretrain_train_s'] for x in pool) / len(pool) if pool else None


METRICS = (('knn_top1', '20-NN top-1 (%)'), ('linprobe_top1', 'linear top-1 (%)'),
           ('finetune_top1', 'fine-tune top-1, best epoch (%)'))


def render(results: dict, folder: Path) -> None:
    """study_results.md (table) and study_accuracy_vs_time.png beside the JSON. Pretrain time is
    the training loop's (the epochs' sum, what FreezeOut changes); wall adds the process start,
    data set-up and checkpoint writing."""
    runs = sorted(results['runs'].values(), key=lambda r: (r['config'] != 'regular', r['config'], r['seed']))
    if not runs:
        return
    lines = ['| config | seed | pretrain time (s) | wall (s) | time saved | FLOP estimate | img/s | kNN top-1 | '
             'linear top-1 | fine-tune top-1 (best epoch) | device | date |', '|' + '---|' * 12]
    for r in runs:
        base = regular_baseline(runs, r)
        saved = f'{1 - r["pretrain_train_s"] / base:.1%}' if base else 'n/a'
        ft = f'{r["finetune_top1"]:.2f}' if 'finetune_top1' in r else ''
        wall = f'{r["pretrain_wall_s"]:.0f}' if 'pretrain_wall_s' in r else ''
        lines.append(f'| {r["config"]} | {r["seed"]} | {r["pretrain_train_s"]:.1f} | {wall} | {saved} | '
                     f'{r["flops_saving_estimate"]:.1%} | {r["pretrain_img_per_s"]:.0f} | {r["knn_top1"]:.2f} | '
                     f'{r["linprobe_top1"]:.2f} | {ft} | {r["device"]} | {r["date"]} |')
    lines += ['', 'Time saved: against the mean pretraining loop of the regular runs on the same host '
              '(else the same card). Accuracies are on the val split, which also chose the best config.']
    (folder / 'study_results.md').write_text('\n'.join(lines) + '\n')

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    metrics = [(key, label) for key, label in METRICS if any(key in r for r in runs)]
    configs = sorted({r['config'] for r in runs}, key=lambda c: (c != 'regular', c))
    colour = {c: plt.get_cmap('tab10')(i % 10) for i, c in enumerate(configs)}
    first_seed = min(r['seed'] for r in runs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), dpi=120, squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for r in runs:
            if key not in r:
                continue
            filled = r['seed'] == first_seed  # later seeds: hollow markers
            ax.scatter(r['pretrain_train_s'], r[key], s=40, color=colour[r['config']] if filled else 'none',
                       edgecolors=colour[r['config']], linewidths=1.5)
        ax.set_xlabel('pretraining loop time (s)')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker='o', ls='', color=colour[c], label=c) for c in configs]
    others = sorted({r['seed'] for r in runs} - {first_seed})
    handles.append(plt.Line2D([], [], marker='o', ls='', color='grey', markerfacecolor='none', label=(
        f'filled: seed {first_seed}' + (f'; hollow: seed {", ".join(map(str, others))}' if others else ''))))
    fig.legend(handles=handles, loc='lower center', ncol=min(len(handles), 4), fontsize=7, frameon=False)
    cards = ', '.join(sorted({r['device'] for r in runs}))
    size = f' at {runs[0]["input_size"]} px' if 'input_size' in runs[0] else ''
    fig.suptitle(f'{runs[0]["model"]}{size}, {runs[0]["epochs"]} epochs; {cards}', fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(folder / 'study_accuracy_vs_time.png')
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.quick:
        apply_quick(args, parser.parse_args([]))
    # absolute: the runs' scripts are started from ViT/, whatever the caller's directory
    quick = ROOT / 'study_out' / 'quick'
    args.out = str(Path(args.out or (quick if args.quick else ROOT / 'study_out')).resolve())
    args.results = str(Path(args.results or (Path(args.out) / 'study_results.json' if args.quick else
                                              ROOT / 'image' / 'study_results.json')).resolve())
    args.data_path = str(Path(args.data_path).resolve())
    from util.runtime import check_number_flags
    check_number_flags(args)  # what run_pretrain would refuse, once, not once per run
    import torch
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    args.data_backend = args.data_backend or ('gpu-cache' if args.device.startswith('cuda') else 'pil')
    from util.data import build_classification_datasets, require_data_path
    require_data_path(args.data_path)
    if not (Path(args.data_path) / 'train').is_dir() or not (Path(args.data_path) / 'val').is_dir():
        raise SystemExit(f'error: --data_path {args.data_path} needs train/ and val/ class folders '
                         f'(e.g. {ROOT.parent / "shared" / "data" / "imagenette-128"})')
    # the scoring scripts' own check of both splits (empty class folders, val classes that train lacks): a data
    # error would otherwise fail every run of the study in turn, each after its pretraining
    build_classification_datasets(args.data_path, None, None)
    # where the runs and the results go (created here, so after the data): before the first run, not after it
    check_output_folder(args.out, f'--out {args.out}')
    if Path(args.results).is_dir():
        raise SystemExit(f'error: --results {args.results} is a folder; give the JSON file, e.g. '
                         f'{Path(args.results) / "study_results.json"}')
    check_output_folder(Path(args.results).parent, f'the folder of --results {args.results}')
    python_command()  # a VIT_PYTHON that cannot start: the error now, not from the first run
    study = Study(args)
    try:
        run_study(study, args)
    except OutOfTime as e:
        print(f'study stopped early: {e}. Recorded runs are in {args.results}; the same command continues.',
              flush=True)
    except UnreadableData as e:
        raise SystemExit(f'{e}; every run of the study reads that file, so the study stopped: replace or remove it, '
                         f'and the same command continues (recorded runs are in {args.results})') from None
    except KeyboardInterrupt:
        again = 'the same command without --rerun' if args.rerun else 'the same command'
        print(f'interrupted: the runs recorded so far are in {args.results}; {again} continues with the '
              'others (the run cut short starts again from scratch)', file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    study.save()
    table = Path(args.results).parent / 'study_results.md'
    if table.is_file():
        print(table.read_text())
        print(f'results: {args.results}, with its table {table.name} and plot study_accuracy_vs_time.png beside it; '
              f'runs\' logs and checkpoints in {args.out}')
    if study.failures:
        raise SystemExit(f'error: {len(study.failures)} run(s) of the study failed (the others are recorded in '
                         f'{args.results}; the same command tries the failed ones again):\n\n' +
                         '\n\n'.join(study.failures))
    return study.results


def run_study(study: Study, args: argparse.Namespace) -> None:
    """The runs in order of importance (each fine-tune right after its pretraining, while its
    checkpoint is on this machine), so a study cut short by --max_minutes keeps the main comparison."""
    first, second = args.seeds
    study.pretrain('regular', [], first)
    if not args.no_finetune:
        study.finetune(f'regular/seed{first}')
    names = QUICK_CONFIGS if args.quick else list(FREEZEOUT_CONFIGS)
    scored = {name: study.pretrain(name, FREEZEOUT_CONFIGS[name], first) for name in names}
    scored = {name: record for name, record in scored.items() if record is not None}
    if not scored:
        print('no FreezeOut config finished: the best config\'s runs are left out')
        study.pretrain('regular', [], second)
        return
    score = {name: round(r['knn_top1'] + r['linprobe_top1'], 2) for name, r in scored.items()}  # as printed
    best = study.results.get('best')  # chosen once: later sessions continue with the same config
    kept = best in scored and not args.rerun
    if not kept:
        best = max(scored, key=score.get)
        study.results['best'] = best
        study.save()
    tied = [name for name in scored if name != best and score[name] == score[best]]
    why = ('; chosen by an earlier invocation of the study and kept' if kept else
           f'; tied with {", ".join(tied)}: the first in the study\'s order is taken' if tied else '')
    print(f'best FreezeOut config by 20-NN + linear accuracy: {best} ('
          + ', '.join(f'{name} {score[name]:.2f}' for name in sorted(score, key=score.get, reverse=True)) + why + ')')
    if not args.no_finetune:
        study.finetune(f'{best}/seed{first}')
    study.pretrain(f'{best}-never', FREEZEOUT_CONFIGS[best] + ['--decoder_freeze', 'never'], first)
    study.pretrain('regular', [], second)
    study.pretrain(best, FREEZEOUT_CONFIGS[best], second)


if __name__ == '__main__':
    util.startup.run_tool(main)
