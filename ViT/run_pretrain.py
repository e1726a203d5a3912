"""LocalMIM pretraining, plain or with FreezeOut (--t_0).

    python run_pretrain.py --model MIM_vit_base_patch16 --data_path /path/to/imagenet ...
    python -m torch.distributed.launch --nproc_per_node=8 run_pretrain.py ...
    torchrun --nproc_per_node=8 run_pretrain.py ...
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from util import freezeout as fo
from util.cli import ArgumentParser
from util.flags import (AMP_CHOICES, BACKENDS, DEFAULT_NUM_WORKERS, GPU_RESAMPLE_CHOICES, MIM_MODELS, add_dist_args,
                        add_save_flags, answer_before_imports, check_save_flags)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description='LocalMIM pretraining (optionally with FreezeOut)')
    parser.add_argument('--batch_size', default=128, type=int,
                        help='batch size per process (effective batch = batch_size * accum_iter * processes)')
    parser.add_argument('--epochs', default=400, type=int, help='pretraining epochs (the whole run\'s length, '
                        'which FreezeOut\'s schedule spans)')
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='micro-batches accumulated per optimizer step')

    g = parser.add_argument_group('model')
    g.add_argument('--model', default='MIM_vit_base_patch16', type=str,
                   help=f'one of: {", ".join(sorted(MIM_MODELS))}')
    g.add_argument('--input_size', default=224, type=int, help='image side; the token grid must be even')
    g.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of patches removed')
    g.add_argument('--hog_nbins', default=9, type=int, help='orientation bins of the HOG targets')
    g.add_argument('--hog_bias', action='store_true', help='bias in the HOG Sobel conv (upstream, ViT-L)')

    g = parser.add_argument_group('optimisation')
    g.add_argument('--weight_decay', type=float, default=0.05, help='AdamW weight decay (not on biases and norms)')
    g.add_argument('--lr', type=float, default=None, help='absolute lr (default: blr * effective batch / 256)')
    g.add_argument('--blr', type=float, default=1e-3, help='base lr: lr = blr * effective batch / 256')
    g.add_argument('--min_lr', type=float, default=1e-6,
                   help='floor of the cosine (plain runs; FreezeOut anneals each layer to 0)')
    g.add_argument('--warmup_epochs', type=int, default=40, help='epochs of linear lr warmup')
    g.add_argument('--amp', default='auto', choices=list(AMP_CHOICES),
                   help='mixed precision: auto = bf16 on GPUs that support it, none on CPU; '
                        'fp16 uses a GradScaler')
    g.add_argument('--compile', action='store_true', help='torch.compile the model (recompiles once per freeze event)')
    g.add_argument('--compile_backend', default='inductor', help=argparse.SUPPRESS)  # 'eager' in tests

    g = parser.add_argument_group('FreezeOut (off unless --t_0 is given)')
    g.add_argument('--t_0', type=float, default=None,
                   help='fraction of the run at which the first layer (patch embedding) freezes, before '
                        'scaling; the last block trains to the end')
    g.add_argument('--how_scale', default='cubic', choices=list(fo.SCALE_FUNCTIONS),
                   help='freeze time of layer i: s(t_0 + (1 - t_0) i / (L - 1)) with s = x, x^2 or x^3')
    g.add_argument('--scale_lr', dest='scale_lr', action='store_true', default=True,
                   help='peak lr of layer i = lr / t_i (FreezeOut\'s default)')
    g.add_argument('--no_scale_lr', dest='scale_lr', action='store_false', help='every layer peaks at lr')
    g.add_argument('--decoder_freeze', default='tap', choices=list(fo.DECODER_FREEZE_MODES),
                   help='tap: a LocalMIM decoder, its norm and HOG scale are dropped when the block it reads '
                        'freezes; never: decoders train to the end on frozen features')

    g = parser.add_argument_group('data, output, run')
    g.add_argument('--data_path', default='./dataset/ImageNet/', type=str,
                   help='ImageFolder root: <path>/train/<class>/..., <path>/train/image_folders/<class>/... '
                        'or the class folders themselves')
    g.add_argument('--output_dir', default='./output_dir', help='checkpoints, log.txt, freezeout_schedule.json')
    g.add_argument('--log_dir', default=None, help='tensorboard folder (default: --output_dir)')
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    g.add_argument('--seed', default=0, type=int, help='seed of the model init, masks and augmentation '
                   '(process r uses seed + r)')
    g.add_argument('--resume', default='', help='checkpoint to resume from')
    g.add_argument('--auto_resume', dest='auto_resume', action='store_true', default=True,
                   help='resume from the newest checkpoint in --output_dir (default on)')
    g.add_argument('--no_auto_resume', dest='auto_resume', action='store_false',
                   help='start afresh even when --output_dir holds checkpoints (an earlier run\'s files are moved '
                        'to previous-<time>/ there)')
    g.add_argument('--start_epoch', default=0, type=int, help='first epoch when not resuming')
    add_save_flags(g, 50)
    g.add_argument('--print_freq', default=50, type=int, help='console/tensorboard line every N iterations')
    g.add_argument('--num_workers', default=DEFAULT_NUM_WORKERS, type=int,
                   help='DataLoader worker processes per training process (default: 10, or the usable CPUs if fewer)')
    g.add_argument('--data_backend', default='pil', choices=list(BACKENDS),
                   help='pil: CPU workers decode and augment (upstream); gpu: workers read JPEG bytes, the GPU '
                        'decodes and augments; gpu-cache: all images decoded once and kept on the GPU')
    g.add_argument('--decode_ahead', default=2, type=int,
                   help='gpu: batches decoded and augmented in advance by a background thread on its own '
                        'CUDA stream (0: on the training thread, which then waits for each decode)')
    g.add_argument('--cpu_decode_share', default=0.0, type=float,
                   help='gpu: share of each batch that the loader workers decode on the CPU (full size, '
                        'libjpeg) while nvjpeg decodes the rest, so the CPU cores add to the GPU decoder; '
                        'crops and flips are the same either way (benchmark.py --cpu_decode_shares times it)')
    g.add_argument('--gpu_resample', default='bicubic', choices=GPU_RESAMPLE_CHOICES,
                   help='gpu, gpu-cache: how a crop is resized. bicubic: one grid_sample for the batch, not '
                        'antialiased, so a crop it shrinks comes out sharper and aliased compared with pil\'s '
                        '(and so do its HOG targets); the speeds in the README were measured with it. pil: the '
                        'pil backend\'s pixels (PIL\'s antialiased bicubic, within 1 grey level on random crops, '
                        'tested) by '
                        'batched matmuls; not yet timed on a GPU')
    g.add_argument('--cache_size', default=None, type=int,
                   help='gpu-cache: square side of the cached images (default: the images\' own size when '
                        'they all have one, else input_size * 1.15, with a note when that is below most '
                        'images\' shorter side); non-square images are cached as their centre square, so '
                        'random crops never see their sides (unlike pil)')
    g.add_argument('--pin_mem', action='store_true', default=True,
                   help='pinned host memory for faster copies to the GPU')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin host memory')
    add_dist_args(parser)
    return parser


if __name__ == '__main__':
    answer_before_imports(get_args_parser())

# the rest of the imports load torch, timm and torchvision (seconds): after the parser, so that
# --help and a refused flag are answered without them
import torch  # noqa: E402

import models_mim  # noqa: E402
from engine_pretrain import SCALE_NAMES, ModelHandle, epoch_done_line, train_one_epoch  # noqa: E402
from util import checkpoint, dist, flops  # noqa: E402
from util.checkpoint import find_resume_checkpoint, save_checkpoint  # noqa: E402
from util.encoder_loading import written_by  # noqa: E402
from util.gpu_data import build_loader, check_cpu_decode_share, input_bound_hint  # noqa: E402
from util.log import RunEta, append_json_line, format_seconds, make_writer, start_line  # noqa: E402
from util.lr_sched import PlainSchedule, optimizer_steps_per_epoch  # noqa: E402
from util.optim import build_adamw, param_groups_weight_decay  # noqa: E402
from util.runtime import allow_recompiles, run_main, set_lr, setup  # noqa: E402


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.accum_iter < 1 or args.epochs < 1:
        raise SystemExit('error: --batch_size, --accum_iter and --epochs must be at least 1')
    models_mim.check_model(args.model, args.input_size)
    if not 0.0 < args.mask_ratio < 1.0:  # the loss is over masked patches: 0 would divide by 0
        raise SystemExit(f'error: --mask_ratio must be in (0, 1), got {args.mask_ratio}')
    tokens = (args.input_size // (14 if args.model.endswith('patch14') else 16)) ** 2
    if int(tokens * (1 - args.mask_ratio)) < 1:  # random_masking keeps int(L * (1 - ratio)) tokens
        raise SystemExit(f'error: --mask_ratio {args.mask_ratio} leaves none of the {tokens} tokens visible at '
                         f'--input_size {args.input_size}; a ratio below {1 - 1 / tokens:.4g} keeps one')
    if args.hog_nbins < 1:
        raise SystemExit(f'error: --hog_nbins must be at least 1, got {args.hog_nbins}')
    check_save_flags(args)
    if args.print_freq < 1:
        raise SystemExit('error: --print_freq must be at least 1')
    if args.decode_ahead < 0:
        raise SystemExit(f'error: --decode_ahead must be 0 or more, got {args.decode_ahead}')
    check_cpu_decode_share(args.data_backend, args.cpu_decode_share)
    if args.gpu_resample != 'bicubic' and args.data_backend == 'pil':
        raise SystemExit(f'error: --gpu_resample applies to the gpu backends only (the pil backend is PIL); '
                         f'got --data_backend pil --gpu_resample {args.gpu_resample}')
    if args.warmup_epochs > args.epochs:
        raise SystemExit(f'error: --warmup_epochs {args.warmup_epochs} is longer than --epochs {args.epochs}')
    if args.t_0 is not None:
        fo.validate(args.t_0, args.how_scale, args.decoder_freeze, args.warmup_epochs, args.epochs)
    else:  # FreezeOut's own flags without --t_0 would silently run plain LocalMIM
        given = [flag for flag, set_ in ((f'--how_scale {args.how_scale}', args.how_scale != 'cubic'),
                                         ('--no_scale_lr', not args.scale_lr),
                                         (f'--decoder_freeze {args.decoder_freeze}', args.decoder_freeze != 'tap'))
                 if set_]
        if given:
            raise SystemExit(f'error: {", ".join(given)} configure(s) FreezeOut, which is off without --t_0: '
                             f'add --t_0 (e.g. 0.8), or drop them for a plain LocalMIM run')


def check_fresh_start_epoch(args: argparse.Namespace, schedule, start_step: int) -> None:
    """--start_epoch without a checkpoint: the initial weights start mid-schedule. Under FreezeOut,
    layers whose freeze step has passed would stay at their random init for the whole run."""
    frozen = schedule.schedule.num_frozen(start_step) if args.t_0 is not None else 0
    if frozen:
        raise SystemExit(f'error: --start_epoch {args.start_epoch} with no checkpoint to resume from: FreezeOut\'s '
                         f'schedule has {fo.layers_frozen(frozen)} by then, which would keep their random init for '
                         f'the whole run; resume from a checkpoint (--resume, or the run\'s --output_dir), or drop '
                         f'--start_epoch')
    print(f'note: --start_epoch {args.start_epoch} with no checkpoint to resume from: the initial weights '
          f'train from epoch {args.start_epoch}\'s point of the lr schedule')


# flags whose change between a checkpoint and its resumption changes the run
RESUME_FLAGS = ('model', 'input_size', 'mask_ratio', 'hog_nbins', 'hog_bias', 'epochs', 'warmup_epochs', 'batch_size',
                'accum_iter', 'world_size', 'blr', 'lr', 'min_lr', 'weight_decay', 't_0', 'how_scale', 'scale_lr',
                'decoder_freeze', 'seed', 'data_backend', 'gpu_resample', 'cache_size', 'data_path')


def frozen_set(model: torch.nn.Module) -> dict:
    """What the checkpoint records of FreezeOut's state: frozen prefix length and live taps."""
    return {'num_frozen': model.num_frozen, 'live_taps': list(model.live_taps)}


def refuse_thawing(path: Path, saved: dict | None, model: torch.nn.Module) -> None:
    """A FreezeOut schedule spans the whole run, so resuming with another run length (--epochs,
    --t_0, --how_scale, or steps per epoch: --batch_size, --accum_iter, processes, data) can put
    the resume step before freeze steps that the checkpointed run had passed. Those layers'
    optimizer state was freed when they froze and their taps' decoders stopped: refuse."""
    if not saved:  # written by upstream or before the frozen set was recorded
        return
    thawed = list(range(model.num_frozen, saved['num_frozen']))
    revived = sorted(set(model.live_taps) - set(saved['live_taps']))
    if thawed or revived:
        what = []
        if thawed:
            what.append(f'unfreeze layers {thawed[0]}..{thawed[-1]}')
        if revived:
            what.append(f'bring back dropped taps {[SCALE_NAMES[j] for j in revived]}')
        raise checkpoint.CheckpointError(
            f'resuming {path} with these flags would {" and ".join(what)}: the checkpointed run had '
            f'{fo.layers_frozen(saved["num_frozen"])}, this schedule has {model.num_frozen} at the resume step. '
            f'A FreezeOut schedule spans the whole run (--epochs, --t_0, --how_scale, and the steps per epoch '
            f'set by --batch_size, --accum_iter, the number of processes and the data), and frozen layers '
            f'have lost their optimizer state. Resume with the run\'s own flags, or start a new run '
            f'(--no_auto_resume or another --output_dir)')


def resume_training(args: argparse.Namespace, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    loss_scaler, schedule, steps_per_epoch: int) -> int:
    """Loads model, optimizer, scaler and RNG states; returns the epoch to continue at. The
    frozen set of the resume step is applied after the optimizer state is loaded, so that it
    also frees the Adam moments of a layer that freezes exactly at that step (the checkpoint
    was saved just before it froze)."""
    ckpt = checkpoint.load(path)
    if 'model' not in ckpt:
        raise checkpoint.CheckpointError(f'{path} has no "model" entry; not a pretraining checkpoint')
    writer = written_by(ckpt['model']) if isinstance(ckpt['model'], dict) else None
    if writer in ('run_finetune.py', 'run_linprobe.py'):  # before the note on its flags, which would be noise
        raise checkpoint.CheckpointError(
            f'{path} is a classifier checkpoint ({writer}); run_pretrain.py resumes only its own checkpoints (and '
            f'the classifier scripts take pretraining ones as --finetune)')
    checkpoint.note_changed_flags(path, ckpt.get('args'), args, RESUME_FLAGS)
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise checkpoint.CheckpointError(
            f'{path} does not fit --model {args.model} at --input_size {args.input_size}: '
            f'{checkpoint.state_dict_mismatch(e)} (resume with the run\'s own flags, or start afresh with '
            f'--no_auto_resume / another --output_dir)') from None
    start_epoch = int(ckpt['epoch']) + 1
    checkpoint.restore_training_state(
        ckpt, path, optimizer, loss_scaler,
        'plain and FreezeOut (--t_0) runs, and --decoder_freeze tap / never, group parameters differently. '
        'Resume with the run\'s own flags, or start afresh with --no_auto_resume / another --output_dir')
    schedule.on_step(start_epoch * steps_per_epoch)
    refuse_thawing(path, ckpt.get('frozen'), model)
    # (a finished run has no next step: the state "at" step T, past every event, would be no run's)
    frozen = (f' with {fo.layers_frozen(model.num_frozen)}, live taps {[SCALE_NAMES[j] for j in model.live_taps]}'
              if isinstance(schedule, fo.FreezeOut) and start_epoch < args.epochs else '')
    print(f'resumed from {path} (epoch {ckpt["epoch"]}); continuing at epoch {start_epoch}{frozen}')
    return start_epoch


def estimated_epoch_costs(args: argparse.Namespace, freeze_steps: Sequence[int], steps_per_epoch: int) -> list[float]:
    """Each epoch's FLOPs per image (FreezeOut's frozen layers cost less), for the run's time-left
    estimate; equal costs for a model the FLOP model does not know."""
    shape = flops.SHAPES.get(args.model)
    if shape is None:
        return [1.0] * args.epochs
    shape = dataclasses.replace(shape, img_size=args.input_size, mask_ratio=args.mask_ratio)
    return flops.epoch_costs(shape, freeze_steps, steps_per_epoch, args.epochs, args.decoder_freeze)


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    device = setup(args)
    if not args.output_dir:
        print('note: no --output_dir: no checkpoint, log.txt or schedule is written, so this run cannot be resumed')
    world, rank = dist.get_world_size(), dist.get_rank()
    eff_batch = set_lr(args)
    # before the data and the resume, so that a second start of the same command stops at once
    checkpoint.lock_run_folder(args.output_dir, args.log_dir)

    model = models_mim.build_model(args.model, img_size=args.input_size, hog_nbins=args.hog_nbins,
                                   hog_bias=args.hog_bias)
    model.to(device)
    loader = build_loader(args.data_backend, args.data_path, args.input_size, args.batch_size, args.seed,
                          args.num_workers, args.pin_mem and device.type == 'cuda', world, rank, device,
                          args.cache_size, args.decode_ahead, args.cpu_decode_share, args.gpu_resample)
    print(f'data: {loader.dataset.root}: {len(loader.dataset)} images, {len(loader)} batches per process')
    steps_per_epoch = optimizer_steps_per_epoch(len(loader), args.accum_iter)

    print(f'base lr: {args.lr * 256 / eff_batch:.2e}  actual lr: {args.lr:.2e}  accum_iter: {args.accum_iter}  '
          f'effective batch: {eff_batch}  amp: {args.amp}  device: {device}')

    if args.t_0 is not None:
        schedule_table = fo.FreezeOutSchedule.build(
            model.num_layers, model.tap_layers, args.lr, args.t_0, args.how_scale, args.scale_lr,
            args.decoder_freeze, args.epochs, steps_per_epoch, args.warmup_epochs)
        layer_of = lambda name: fo.schedule_layer(name, model.tap_layers, args.decoder_freeze, model.num_layers)  # noqa: E731
        optimizer = build_adamw(param_groups_weight_decay(model, args.weight_decay, layer_of), args.lr, device)
        schedule = fo.FreezeOut(model, optimizer, schedule_table)
        table = schedule_table.table(fo.param_prefixes(model, schedule_table))
        print(fo.format_table(table))
        if all(row['freeze_step'] >= table['total_steps'] for row in table['layers']):
            print(f'note: no layer freezes within these {table["total_steps"]} steps, so this FreezeOut run saves '
                  f'no time (a lower --t_0, or more steps)')
    else:
        optimizer = build_adamw(param_groups_weight_decay(model, args.weight_decay), args.lr, device)
        schedule = PlainSchedule(optimizer, args.lr, args.min_lr, args.warmup_epochs, args.epochs, len(loader),
                                 args.accum_iter)
    loss_scaler = torch.amp.GradScaler(device.type) if args.amp == 'fp16' else None

    # resume: the frozen set of the resume step is applied after the optimizer state is loaded
    start_epoch = args.start_epoch
    resume_path = find_resume_checkpoint(args)
    if resume_path is not None:
        start_epoch = resume_training(args, resume_path, model, optimizer, loss_scaler, schedule, steps_per_epoch)
    elif start_epoch > 0:
        check_fresh_start_epoch(args, schedule, start_epoch * steps_per_epoch)
    if start_epoch >= args.epochs:  # a finished run relaunched (e.g. requeued): nothing to train
        more = ('a FreezeOut schedule spans its --epochs, so training longer is a new run (another --output_dir)'
                if args.t_0 is not None else 'raise --epochs to train more')
        print(f'all {args.epochs} epochs are done (checkpoint {resume_path}); {more}')
        dist.destroy()
        return {}

    if args.compile:
        allow_recompiles(2 * model.num_layers + 8)  # one graph per freeze event, and margin

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if args.distributed:
            ids = [device.index] if device.type == 'cuda' else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return torch.compile(module, backend=args.compile_backend) if args.compile else module

    handle = ModelHandle(model, wrap)
    continues = checkpoint.start_run_folder(args.output_dir, args.log_dir, start_epoch, resume_path,
                                            keep=(resume_path,))
    if args.t_0 is not None and args.output_dir and dist.is_main_process():
        print(f'wrote {fo.write_table(table, args.output_dir)}')
    log_writer = make_writer(args.log_dir, start_epoch if continues else None)
    print(start_line(args.epochs, start_epoch))
    run_start = time.time()
    eta = RunEta(args.epochs, estimated_epoch_costs(args, schedule_table.freeze_steps if args.t_0 is not None else (),
                                                   steps_per_epoch))
    stats, hinted = {}, False
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(handle, loader, optimizer, device, epoch, loss_scaler, schedule, args, log_writer)
        print(epoch_done_line(epoch, stats, eta.progress(epoch, stats['epoch_time'])), flush=True)
        # once a run, from its second epoch (the first also waits for the workers to start)
        hint = None if hinted or epoch == start_epoch else input_bound_hint(
            args.data_backend, stats['data_wait_s'], stats['epoch_time'], args.cpu_decode_share, device.type)
        if hint:
            print(hint, flush=True)
            hinted = True
        # the log line first: an interruption between the two redoes the epoch (its line set aside)
        append_json_line(args.output_dir, {**{f'train_{k}': v for k, v in stats.items()}, 'epoch': epoch})
        save_checkpoint(args, model, optimizer, loss_scaler, epoch, extra={'frozen': frozen_set(model)})
        if log_writer is not None:
            log_writer.flush()
    total = time.time() - run_start
    print(f'Training time {format_seconds(total)}')
    if dist.is_main_process() and args.output_dir:
        print(f'outputs: {Path(args.output_dir).resolve()} (checkpoints, log.txt); '
              f'tensorboard: {Path(args.log_dir).resolve()}')
    if log_writer is not None:
        log_writer.close()
    dist.destroy()
    return stats


if __name__ == '__main__':
    run_main(main, get_args_parser())
