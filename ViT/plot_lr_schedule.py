r"""Draw FreezeOut's per-layer learning-rate schedule for given pretraining flags.

    python plot_lr_schedule.py --epochs 100 --warmup_epochs 10 --blr 2e-4 --batch_size 2048 \
        --how_scale cubic --t_0 0.8 --out ../image/freezeout_lr_cubic_0.8.png

One curve per layer (warmup included) against % of training, with the plain LocalMIM schedule
dashed for comparison; lr = blr * batch_size * accum_iter * world_size / 256 unless --lr, as in
the run (--world_size: the number of processes the run will have). --help lists the flags that
matter here; run_pretrain.py's others are accepted (and checked as it checks them), so a
pretraining command can be pasted as it is.
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from run_pretrain import check_args, get_args_parser  # noqa: E402
from util import flops  # noqa: E402
from util.cli import ArgumentParser, check_output_folder, help_only_for  # noqa: E402
from util import freezeout as fo  # noqa: E402
from util.lr_sched import warmup_cosine_lr  # noqa: E402
from util.runtime import check_number_flags  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(parents=[get_args_parser()], add_help=False, description=__doc__,
                            conflict_handler='resolve')
    parser.add_argument('--out', default=None,
                        help='figure path; its extension picks the format (png, pdf, svg, ...; none: .png) '
                             '(default: freezeout_lr_<how>_<t_0>.png in the current folder; the README\'s '
                             'figures in image/ are written only when named)')
    parser.add_argument('--points', default=1000, type=int, help='optimizer steps drawn (the x resolution)')
    help_only_for(parser, {'epochs', 'warmup_epochs', 'batch_size', 'accum_iter', 'world_size', 'lr', 'blr', 'min_lr',
                           'model', 't_0', 'how_scale', 'scale_lr', 'decoder_freeze', 'out', 'points'})
    next(a for a in parser._actions if a.dest == 'world_size').help = (
        'processes the run will have (no launcher here): the lr counts them, as the run does')
    args = parser.parse_args(argv)
    if args.t_0 is None:
        raise SystemExit('error: give --t_0 (and --how_scale) to draw a FreezeOut schedule')
    check_number_flags(args)
    check_args(args)  # run_pretrain's checks: draw only what it would run
    if args.world_size < 1:
        raise SystemExit(f'error: --world_size must be at least 1, got {args.world_size}')
    if args.points < 1:
        raise SystemExit(f'error: --points must be at least 1, got {args.points}')
    out = Path(args.out) if args.out else Path(f'freezeout_lr_{args.how_scale}_{args.t_0}.png')
    if out.is_dir():
        raise SystemExit(f'error: --out {out} is a folder; give a file name, e.g. {out / "freezeout_lr.png"}')
    out = out if out.suffix else out.with_suffix('.png')  # matplotlib would add .png itself, unsaid
    formats = sorted(FigureCanvasBase.get_supported_filetypes())  # savefig picks the format by the extension
    if out.suffix[1:].lower() not in formats:
        raise SystemExit(f'error: --out {out}: matplotlib cannot write {out.suffix} files; use one of the '
                         f'extensions {", ".join(formats)}')
    check_output_folder(out.parent, f'the folder of --out {out}')
    eff_batch = args.batch_size * args.accum_iter * args.world_size  # no launcher here: the flag says the count
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    if args.model not in flops.SHAPES:
        raise SystemExit(f'error: unknown --model {args.model}; choose one of: {", ".join(sorted(flops.SHAPES))}')
    depth = flops.SHAPES[args.model].depth
    taps = [b + 1 for b in flops.ModelShape(depth=depth).taps]
    steps_per_epoch = max(args.points // args.epochs, 1)
    schedule = fo.FreezeOutSchedule.build(depth + 1, taps, lr, args.t_0, args.how_scale, args.scale_lr,
                                          args.decoder_freeze, args.epochs, steps_per_epoch, args.warmup_epochs)
    steps = range(schedule.total_steps + 1)
    x = [100 * s / schedule.total_steps for s in steps]

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    cmap = plt.get_cmap('viridis')
    for i in range(schedule.num_layers):
        name = 'patch embed' if i == 0 else f'block {i - 1}'
        ax.plot(x, [schedule.lr(i, s) for s in steps], color=cmap(i / max(schedule.num_layers - 1, 1)),
                lw=1.4, label=f'{name} (t={schedule.t[i]:.2f})')
    plain = [warmup_cosine_lr(s / steps_per_epoch, lr, args.min_lr, args.warmup_epochs, args.epochs) for s in steps]
    ax.plot(x, plain, 'k--', lw=1.2, label='plain LocalMIM')
    ax.set_xlabel('% of training')
    ax.set_ylabel('learning rate')
    scaled = 'lr / t_i' if args.scale_lr else 'lr'
    ax.set_title(f'FreezeOut {args.how_scale}, t_0={args.t_0}, peak {scaled}, lr={lr:.3g} (effective batch '
                 f'{eff_batch}), warmup {args.warmup_epochs}/{args.epochs} epochs', fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc='upper right')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print(f'wrote {out} (lr {lr:.3g}{"" if args.lr is not None else f" = blr x effective batch {eff_batch} / 256"})')
    return out


if __name__ == '__main__':
    util.startup.run_tool(main)
