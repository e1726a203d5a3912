"""The main job on an embedded default: short LocalMIM pretraining of the tiny ViT on real
photos (made from scikit-image's bundled pictures), plain and with FreezeOut, side by side.

    python ViT/demo.py            # one to two minutes on 2 CPU cores

Prints both runs' wall and training-loop times, the FreezeOut schedule, and where the logs and
checkpoints are. The runs start with this interpreter, or the command in $VIT_PYTHON (split on
spaces).
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from util.cli import ArgumentParser, python_command  # noqa: E402
from util.demo_data import make_demo_dataset  # noqa: E402


def run(name: str, flags: list[str], out: Path) -> float:
    script = [str(HERE / 'run_pretrain.py'), *flags, '--output_dir', str(out), '--log_dir', str(out),
              '--no_auto_resume']
    print(f'\n=== {name}: {" ".join(script)}', flush=True)
    if out.exists():  # the demo's own folder: a rerun starts clean (no previous-*/ piles)
        print(f'(replacing the previous demo run in {out})')
        shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([*python_command(), *script], cwd=HERE, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    if proc.returncode != 0:
        raise SystemExit(f'error: the {name} run failed (exit {proc.returncode}); its output is above')
    return time.perf_counter() - start


def less_or_more(new: float, old: float) -> str:
    """'12.3% less' or '4.0% more': the change from old to new, in words a negative saving reads right in."""
    change = 1 - new / old
    return f'{abs(change):.1%} {"less" if change >= 0 else "more"}'


def summary(plain_log: list[dict], freeze_log: list[dict], plain_time: float, freeze_time: float,
            out: Path) -> list[str]:
    """The closing table and sentences: times, the loss of the one scale both runs train to the end
    (the last block's tap; `train_loss` sums only the live taps, so FreezeOut's falls as it drops
    them), and a warning when the machine's pace moved while the epochs that froze nothing ran."""
    plain_loop, freeze_loop = (sum(e['train_epoch_time'] for e in log) for log in (plain_log, freeze_log))
    lines = [f'{"run":<22} {"wall time":>10} {"train loop":>11} {"loss at scale 0.5":>18}  outputs']
    for name, log, wall, loop, folder in (('plain', plain_log, plain_time, plain_loop, 'plain'),
                                          ('FreezeOut cubic 0.8', freeze_log, freeze_time, freeze_loop, 'freezeout')):
        lines.append(f'{name:<22} {wall:>9.1f}s {loop:>10.1f}s {log[-1]["train_loss_scale0.5"]:>18.4f}  '
                     f'{out / folder}')
    lines.append(f'FreezeOut took {less_or_more(freeze_loop, plain_loop)} training-loop time and '
                 f'{less_or_more(freeze_time, plain_time)} wall time (wall adds process start-up and data set-up; '
                 f'a tiny model on CPU is a noisy measure).')
    # epochs after the first (loader start-up) in which nothing was frozen do the same work in both runs
    rates = [e['train_images_per_s'] for log in (plain_log, freeze_log) for e in log[1:]
             if e.get('train_frozen_layers', 0) == 0]
    if len(rates) >= 2 and max(rates) > 1.5 * min(rates):
        lines.append(f'note: the epochs that froze nothing ran at {min(rates):.0f} to {max(rates):.0f} img/s: the '
                     f'machine was busy with other work, so these times say little; rerun on a quiet machine.')
    return lines


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument('--out', default=str(ROOT / 'demo_out'), help='where data, logs and checkpoints go')
    parser.add_argument('--epochs', default=10, type=int, help='epochs of each of the two pretraining runs')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    args = parser.parse_args()
    if args.epochs < 2:  # checked before any run: the first epoch is warmup, which no layer may freeze in
        raise SystemExit('error: --epochs must be at least 2 (1 warmup epoch; FreezeOut cubic t_0 = 0.8 freezes '
                         'its first layer at 51% of the run)')
    python_command()  # a VIT_PYTHON that cannot start: the error now, not after the data is made
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f'error: cannot create --out {out}: {e.strerror or e}') from None
    data = make_demo_dataset(out / 'data', num_classes=8, images_per_class=32, size=96)
    common = ['--model', 'MIM_vit_tiny_patch16', '--input_size', '64', '--batch_size', '16',
              '--epochs', str(args.epochs), '--warmup_epochs', '1', '--blr', '1.5e-3', '--data_path', str(data),
              '--device', args.device, '--num_workers', '2', '--print_freq', '16', '--save_freq', '5']
    freeze = ['--how_scale', 'cubic', '--t_0', '0.8']
    plain_time = run('plain LocalMIM', common, out / 'plain')
    freeze_time = run('LocalMIM + FreezeOut (cubic, t_0 = 0.8)', common + freeze, out / 'freezeout')

    def epochs(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines() if line.strip()]

    print('\n=== summary')
    print('\n'.join(summary(epochs(out / 'plain'), epochs(out / 'freezeout'), plain_time, freeze_time, out)))
    print(f'checkpoints: {out}/*/checkpoint-*.pth; logs: log.txt, cli output above; '
          f'tensorboard --logdir {out}')


if __name__ == '__main__':
    util.startup.run_tool(main)
