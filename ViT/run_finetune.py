"""End-to-end fine-tuning of a pretrained encoder for image classification (MAE / LocalMIM
protocol): AdamW with layer-wise lr decay, per-iteration warmup + cosine, RandAugment, mixup /
cutmix, label smoothing, random erasing, drop path, evaluation every epoch.

    python run_finetune.py --model vit_base_patch16 --finetune /path/checkpoint-99.pth \
        --data_path /path/to/imagenet --output_dir out/
    python -m torch.distributed.launch --nproc_per_node=4 run_finetune.py ... --dist_eval
    torchrun --nproc_per_node=4 run_finetune.py ... --dist_eval

The helpers below (setup, data, resume, evaluation-only) are shared with run_linprobe.py and
run_knn.py.
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
import argparse
import dataclasses
import math
import re
from pathlib import Path
from typing import Callable, Sequence

from util.cli import ArgumentParser
from util.flags import (add_batch_args, add_model_args, add_readout_args, add_run_args, add_training_run_args,
                        answer_before_imports, check_save_flags)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description='Fine-tuning of a pretrained ViT encoder for image classification')
    add_batch_args(parser, batch_size=64, epochs=50)

    g = add_model_args(parser, 'vit_large_patch16', 'classifier',
                       'pretraining checkpoint whose encoder initialises the model (ours or LocalMIM\'s release)')
    g.add_argument('--drop_path', type=float, default=0.1,
                   help='stochastic depth rate, rising linearly over the blocks to this value at the last')
    add_readout_args(parser, global_pool_default=True)

    g = parser.add_argument_group('optimisation')
    g.add_argument('--clip_grad', type=float, default=None, help='clip the gradient norm to this value; unset: no clipping')
    g.add_argument('--weight_decay', type=float, default=0.05,
                   help='AdamW weight decay (none on biases, norms, pos_embed, cls_token)')
    g.add_argument('--lr', type=float, default=None, help='absolute peak lr; unset: blr * effective batch / 256')
    g.add_argument('--blr', type=float, default=1e-3, help='base lr: lr = blr * effective batch / 256')
    g.add_argument('--layer_decay', type=float, default=0.75,
                   help='layer-wise lr decay: layer i trains with lr * layer_decay ** (L - i), L = depth + 1; '
                        'layer 0 is the patch embedding, cls token and pos embed, layer b + 1 block b, '
                        'layer L the final norms and the head')
    g.add_argument('--min_lr', type=float, default=1e-6, help='lr at the end of the cosine')
    g.add_argument('--warmup_epochs', type=float, default=5, help='epochs of linear lr warmup (per iteration)')

    g = parser.add_argument_group('augmentation (timm create_transform)')
    g.add_argument('--color_jitter', type=float, default=None,
                   help='colour jitter strength, >= 0; used only when --aa is none (or names timm\'s 3a set)')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1',
                   help='timm auto-augment policy: rand-<sections> (RandAugment, sections m n p mstd mmax inc t), '
                        'augmix-<sections> (m w d a b mstd), original, originalr, v0, v0r or 3a (-mstd<float>), '
                        'or "none" to disable; an unknown section is refused (timm would skip it)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--remode', type=str, default='pixel', choices=['const', 'rand', 'pixel'],
                   help='random erasing fill')
    g.add_argument('--recount', type=int, default=1, help='random erasing regions per image')
    g.add_argument('--resplit', action='store_true', default=False,
                   help='do not erase the first augmentation split; kept for upstream commands, no effect here '
                        '(this script uses no augmentation splits)')

    g = parser.add_argument_group('mixup / cutmix (timm Mixup; on when --mixup or --cutmix > 0)')
    g.add_argument('--mixup', type=float, default=0, help='mixup alpha; mixup on when > 0')
    g.add_argument('--cutmix', type=float, default=0, help='cutmix alpha; cutmix on when > 0')
    g.add_argument('--cutmix_minmax', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                   help='cutmix min/max box ratio; overrides --cutmix alpha and turns cutmix on')
    g.add_argument('--mixup_prob', type=float, default=1.0, help='probability of mixing a batch at all')
    g.add_argument('--mixup_switch_prob', type=float, default=0.5,
                   help='probability of cutmix instead of mixup when both are on')
    g.add_argument('--mixup_mode', type=str, default='batch', choices=['batch', 'pair', 'elem'],
                   help='mixing parameters drawn per batch, per pair of samples or per sample')

    add_run_args(parser, output_dir='./output_finetune')
    add_training_run_args(parser)
    return parser


if __name__ == '__main__':
    answer_before_imports(get_args_parser())

# the rest of the imports load torch, timm and torchvision (seconds): after the parser, so that
# --help and a refused flag are answered without them
import torch  # noqa: E402

import models_vit  # noqa: E402
from engine_finetune import evaluate, fit, logged_accuracies  # noqa: E402
from engine_pretrain import ModelHandle  # noqa: E402
from util.checkpoint import find_resume_checkpoint, save_checkpoint  # noqa: E402
from util.runtime import run_main, set_lr, setup  # noqa: E402
from util import checkpoint, dist  # noqa: E402
from util.data import (DataLayoutError, build_classification_datasets, build_eval_loader,  # noqa: E402
                       build_train_loader, eval_transform, finetune_train_transform)
from util.encoder_loading import load_pretrained_encoder, written_by  # noqa: E402
from util.log import append_json_line, make_writer  # noqa: E402
from util.lr_decay import describe_groups, param_groups_lrd  # noqa: E402
from util.lr_sched import PlainSchedule, optimizer_steps_per_epoch  # noqa: E402
from util.optim import build_adamw  # noqa: E402

HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init


def check_common_args(args: argparse.Namespace) -> None:
    counts = ['--' + flag for flag in ('batch_size', 'accum_iter', 'epochs') if hasattr(args, flag)]
    if any(getattr(args, flag[2:]) < 1 for flag in counts):
        names = ' and '.join([', '.join(counts[:-1]), counts[-1]] if len(counts) > 1 else counts)
        raise SystemExit(f'error: {names} must be at least 1')
    if getattr(args, 'warmup_epochs', 0) > getattr(args, 'epochs', 1):
        raise SystemExit(f'error: --warmup_epochs {args.warmup_epochs} is longer than --epochs {args.epochs}')
    if args.nb_classes is not None and args.nb_classes < 1:
        raise SystemExit('error: --nb_classes must be at least 1')
    if hasattr(args, 'save_freq'):  # the scripts that train
        check_save_flags(args)
    # before the data folders are scanned, which takes minutes on ImageNet over a network file system
    models_vit.check_model(args.model, args.input_size)
    for flag in ('finetune', 'resume'):
        path = getattr(args, flag, None)
        if path and not Path(path).is_file():
            if flag == 'finetune' and (getattr(args, 'eval', False) or continues_a_run(args)):
                continue  # the weights come from the run's own checkpoint (encoder_to_load)
            raise SystemExit(f'error: {checkpoint.missing_file_message(f"--{flag} {path}", path)}')
    encoder = getattr(args, 'finetune', None)
    if encoder and args.output_dir and Path(encoder).resolve().parent == Path(args.output_dir).resolve():
        # checkpoint names would collide (checkpoint-<N>.pth of both runs), and auto-resume would
        # take the pretraining checkpoints for this run's
        raise SystemExit(f'error: --output_dir {args.output_dir} holds the --finetune encoder {encoder}: '
                         f'write this run into another folder')


def continues_a_run(args: argparse.Namespace) -> bool:
    """Whether this training run starts from a checkpoint of its own: --resume, or auto-resume
    with a checkpoint in --output_dir (an unreadable one included: resuming reports it)."""
    if getattr(args, 'resume', None):
        return True
    if not getattr(args, 'auto_resume', False) or not args.output_dir:
        return False
    try:
        return checkpoint.newest_checkpoint(args.output_dir, resuming=False) is not None
    except checkpoint.CheckpointError:
        return True


def encoder_to_load(args: argparse.Namespace, random_init_note: str) -> str | None:
    """--finetune, unless --eval or --resume (the checkpoint holds every weight) or the file is gone and the run
    continues from its own checkpoint, which replaces the encoder's weights anyway (a pretraining
    folder started afresh moves its checkpoints aside; a big encoder may be deleted)."""
    if args.eval:
        return None
    if args.resume and args.finetune:  # its weights would be loaded only to be replaced
        print(f'note: --resume {args.resume} holds every weight of the run it continues, so --finetune '
              f'{args.finetune} is not loaded')
        return None
    if args.finetune and not Path(args.finetune).is_file():  # check_common_args: only when continuing a run
        print(f'note: --finetune {args.finetune} does not exist; continuing the run in {args.output_dir}, whose '
              f'checkpoint holds the weights')
        return None
    if not args.finetune:
        print(f'note: no --finetune given; {random_init_note}')
    return args.finetune or None


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# The sections of an --aa string that timm 1.0.31's parsers read (timm/data/auto_augment.py:
# rand_augment_transform, augment_and_mix_transform, auto_augment_transform): a policy name, then
# "-"-separated <key><number> sections. timm skips a section without a digit, and a rand "t..." section
# names a transform set whose unknown names fall back to the default, both without a word, so a typo
# ("inc1" as "incl") trained with the default; these are refused instead.
AA_SECTIONS = {
    'rand': {'m': 'm<int> magnitude', 'n': 'n<int> ops per image', 'p': 'p<float> probability of each op',
             'mstd': 'mstd<float> magnitude std', 'mmax': 'mmax<int> magnitude limit',
             'inc': 'inc<0|1> severity increasing with magnitude', 't': 't<set> transform set'},
    'augmix': {'m': 'm<int> severity', 'w': 'w<int> chain width', 'd': 'd<int> chain depth',
               'a': 'a<float> mixing alpha', 'b': 'b<0|1> blend', 'mstd': 'mstd<float> magnitude std'},
    'auto': {'mstd': 'mstd<float> magnitude std'},
}
AA_RAND_SETS = ('weights', '3aw', '3a')  # rand's t<set>
AA_AUTO_POLICIES = ('original', 'originalr', 'v0', 'v0r', '3a')  # AutoAugment's policy names


def check_aa(aa: str) -> None:
    """Refuses an --aa policy that timm would refuse (in the first loader worker, with a traceback)
    or read only in part (a name or section outside AA_SECTIONS)."""
    if aa in ('', 'none', 'None'):
        return
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    # timm's create_transform picks the parser by these prefixes
    kind, parse = (('rand', rand_augment_transform) if aa.startswith('rand') else
                   ('augmix', augment_and_mix_transform) if aa.startswith('augmix') else
                   ('auto', auto_augment_transform))
    name, *sections = aa.split('-')
    if (kind == 'auto' and name not in AA_AUTO_POLICIES) or (kind != 'auto' and name != kind):
        raise SystemExit(f'error: --aa {aa} is not a timm augmentation policy: {name!r} is none of rand-..., '
                         f'augmix-..., {", ".join(AA_AUTO_POLICIES)} (these optionally -mstd<float>) or none')
    accepted = AA_SECTIONS[kind]
    for section in sections:
        if kind == 'rand' and section.startswith('t'):
            if section[1:] not in AA_RAND_SETS:
                raise SystemExit(f'error: --aa {aa}: unknown transform set {section!r}; rand takes t<set> with '
                                 f'<set> one of {", ".join(AA_RAND_SETS)}')
            continue
        key, number = re.match(r'(\D*)(.*)', section).groups()  # timm's split: the key ends at the first digit
        if key not in accepted or not number:
            raise SystemExit(f'error: --aa {aa}: unknown section {section!r}; {name} takes '
                             f'{", ".join(accepted.values())} (e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, '
                             f'original-mstd0.5)')
    try:  # the values: timm's own parser
        parse(aa, {})
    except (AssertionError, ValueError, KeyError) as e:
        raise SystemExit(f'error: --aa {aa} is not a timm augmentation policy '
                         f'(e.g. rand-m9-mstd0.5-inc1, original, none): {e}') from None


def check_args(args: argparse.Namespace) -> None:
    check_common_args(args)
    if not 0.0 < args.layer_decay <= 1.0:
        raise SystemExit(f'error: --layer_decay must be in (0, 1], got {args.layer_decay}')
    if not 0.0 <= args.smoothing < 1.0:
        raise SystemExit(f'error: --smoothing must be in [0, 1), got {args.smoothing}')
    for flag, low, high in (('drop_path', 0.0, 0.999), ('reprob', 0.0, 1.0), ('mixup_prob', 0.0, 1.0),
                            ('mixup_switch_prob', 0.0, 1.0)):
        if not low <= getattr(args, flag) <= high:
            raise SystemExit(f'error: --{flag} must be in [{low:g}, {1 if high < 1 else high:g}'
                             f'{")" if high < 1 else "]"}, got {getattr(args, flag)}')
    if not all(math.isfinite(a) and a >= 0 for a in (args.mixup, args.cutmix)):  # nan would turn them off unsaid
        raise SystemExit(f'error: --mixup and --cutmix are Beta alphas, 0 (off) or more; '
                         f'got {args.mixup}, {args.cutmix}')
    if args.color_jitter is not None and not (math.isfinite(args.color_jitter) and args.color_jitter >= 0):
        raise SystemExit(f'error: --color_jitter must be a finite number >= 0 (or unset: no jitter), '
                         f'got {args.color_jitter}')
    if args.cutmix_minmax is not None and not 0 < args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1:
        raise SystemExit(f'error: --cutmix_minmax MIN MAX needs 0 < MIN < MAX <= 1, got {args.cutmix_minmax}')
    if args.clip_grad is not None and not args.clip_grad > 0:
        raise SystemExit(f'error: --clip_grad must be above 0 (leave it unset for no clipping), got {args.clip_grad}')
    if args.recount < 1:
        raise SystemExit(f'error: --recount must be at least 1, got {args.recount}')
    check_aa(args.aa)
    if mixup_active(args) and args.batch_size % 2:
        raise SystemExit(f'error: mixup/cutmix mixes pairs of samples and needs an even --batch_size, '
                         f'got {args.batch_size}')


# ---- shared set-up ------------------------------------------------------------------------------

def build_data(args: argparse.Namespace, train_transform, val_transform, device: torch.device):
    """(train_loader or None under --eval, val_loader). Sets args.nb_classes from the train
    split when it is not given."""
    world, rank = dist.get_world_size(), dist.get_rank()
    train_set, val_set = build_classification_datasets(args.data_path, train_transform, val_transform)
    found = len(train_set.classes)
    if args.nb_classes is None:
        args.nb_classes = found
    elif args.nb_classes < found:
        raise DataLayoutError(f'--nb_classes {args.nb_classes} is smaller than the {found} classes in {train_set.root}')
    print(f'data: train {train_set.root} ({len(train_set)} images), val {val_set.root} ({len(val_set)} images), '
          f'{found} classes; head with {args.nb_classes} outputs')
    pin = args.pin_mem and device.type == 'cuda'
    train_loader = None if getattr(args, 'eval', False) else build_train_loader(
        train_set, args.batch_size, args.num_workers, pin, args.seed, world, rank)
    sharded = getattr(args, 'dist_eval', False)
    val_loader = build_eval_loader(val_set, args.batch_size, args.num_workers, pin,
                                   world if sharded else 1, rank if sharded else 0)
    return train_loader, val_loader


def ddp_wrapper(args: argparse.Namespace, device: torch.device):
    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if not args.distributed:
            return module
        ids = [device.index] if device.type == 'cuda' else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return wrap


# flags whose change between a checkpoint and its resumption changes the run (fine-tuning and probing)
RESUME_FLAGS = ('model', 'input_size', 'nb_classes', 'global_pool', 'epochs', 'warmup_epochs', 'batch_size',
                'accum_iter', 'world_size', 'blr', 'lr', 'min_lr', 'weight_decay', 'layer_decay', 'drop_path',
                'smoothing', 'mixup', 'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'aa',
                'color_jitter', 'reprob', 'clip_grad', 'seed', 'finetune', 'data_path')


def class_difference(saved: Sequence[str], here: Sequence[str]) -> str:
    """'' when the class lists agree, else where they first part (for the user)."""
    if list(saved) == list(here):
        return ''
    if len(saved) != len(here):
        return f'{len(saved)} classes there, {len(here)} here'
    differ = [i for i, (a, b) in enumerate(zip(saved, here)) if a != b]
    return (f'{len(differ)} of the {len(here)} classes differ, first class {differ[0]}: '
            f'{saved[differ[0]]} there, {here[differ[0]]} here')


def _encoder_file(path: str | None) -> str:
    return str(Path(path).resolve()) if path else 'none (random init)'


@dataclasses.dataclass(frozen=True)
class Resumed:
    """Where a run starts: the epoch, the checkpoint loaded (None: a new run) and that checkpoint's
    record of its epoch's training (None for checkpoints that predate it)."""
    start_epoch: int
    path: Path | None = None
    train_stats: dict | None = None


def resume(args: argparse.Namespace, model: torch.nn.Module, optimizer, loss_scaler,
           classes: Sequence[str]) -> Resumed:
    """Load --resume (or the newest checkpoint in --output_dir).
    `classes`: the data's class names, checked against those the checkpoint's head was trained on."""
    path = find_resume_checkpoint(args)
    if path is None:
        return Resumed(args.start_epoch)
    ckpt = checkpoint.load(path)
    if 'model' not in ckpt:
        raise checkpoint.CheckpointError(f'{path} has no "model" entry; not a checkpoint of this script')
    saved = ckpt.get('args') or {}
    check_written_by_this_script(args, path, ckpt['model'], model)
    if (not args.resume and not args.eval and 'finetune' in saved
            and _encoder_file(saved['finetune']) != _encoder_file(getattr(args, 'finetune', None))):
        if saved['finetune'] and not Path(saved['finetune']).exists():  # moved or deleted: the same one, or not
            print(f'note: {path} continues a run of --finetune {saved["finetune"]}, which is gone; its weights '
                  f'replace those of --finetune {args.finetune or "(none)"} (--no_auto_resume starts afresh)')
        else:  # the checkpoint's weights would silently replace the encoder just loaded
            raise SystemExit(f'error: {args.output_dir} holds a run of --finetune {saved["finetune"] or "(none)"} '
                             f'(resumable from {path}), not of --finetune {args.finetune or "(none)"}: use another '
                             f'--output_dir for this encoder, --no_auto_resume to start it afresh here (the earlier '
                             f'run\'s files are moved aside), or --resume {path} to continue the earlier run')
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        differ = checkpoint.changed_flags(saved, args, ('model', 'input_size', 'nb_classes', 'global_pool'))
        differ = f'; this run has {", ".join(differ)}' if differ else ''
        raise checkpoint.CheckpointError(
            f'{path} does not fit this model ({checkpoint.state_dict_mismatch(e)}){differ}; --resume/--eval take '
            f'checkpoints written by this script '
            'with the same --model/--input_size/--nb_classes/read-out; a pretraining checkpoint goes to --finetune'
        ) from None
    differ = class_difference(ckpt['classes'], classes) if isinstance(ckpt.get('classes'), list) else ''
    if differ and args.eval:  # the head's output i counts as the data's class i: say when they are not the same
        print(f'note: {path} was trained on other classes than {args.data_path} has ({differ}); its accuracy '
              f'counts the checkpoint\'s class i as the data\'s class i')
    elif differ:
        anew = 'without --resume' if args.resume else '(--no_auto_resume or another --output_dir)'
        raise checkpoint.CheckpointError(
            f'{path} was trained on other classes than {args.data_path} has ({differ}): resume it with its own '
            f'data, or start a new run {anew}')
    if not args.eval:  # after the load: a checkpoint that does not fit gets its error alone
        checkpoint.note_changed_flags(path, saved, args, RESUME_FLAGS)
    if optimizer is not None and not args.eval:
        checkpoint.restore_training_state(
            ckpt, path, optimizer, loss_scaler,
            'e.g. saved by another script or with other --layer_decay / --weight_decay grouping; resume '
            'with this script\'s own checkpoint, or pass the weights as --finetune')
    epoch = int(ckpt.get('epoch', -1))
    print(f'{"evaluating" if args.eval else "resumed from"} {path} (epoch {epoch})')
    stats = ckpt.get('train_stats')
    return Resumed(epoch + 1, path, stats if isinstance(stats, dict) else None)


def check_written_by_this_script(args: argparse.Namespace, path: Path, state: dict, model: torch.nn.Module) -> None:
    """A checkpoint of another script (a pretraining one, or a probe's in a fine-tune and back)
    named as such, before its weights fail to fit with a list of missing keys."""
    theirs, this = written_by(state), written_by(model.state_dict())
    if theirs is None or theirs == this:
        return
    own = f'--resume and --eval take {this}\'s own checkpoints'
    if args.resume:
        way = 'pass it as --finetune' if theirs == 'run_pretrain.py' else \
            f'{"evaluate" if args.eval else "resume"} it with {theirs}'
        message = f'{path} is a checkpoint of {theirs}: {way} ({own})'
    elif args.eval:
        message = f'--output_dir {args.output_dir} holds a run of {theirs} ({path}): evaluate it with {theirs}, ' \
                  f'or name this script\'s checkpoint with --resume'
    else:
        other = '(a pretraining checkpoint goes to --finetune)' if theirs == 'run_pretrain.py' else \
            f'(or continue that run with {theirs})'
        message = f'--output_dir {args.output_dir} holds a run of {theirs} ({path}): write this run into another ' \
                  f'--output_dir {other}'
    raise checkpoint.CheckpointError(message)


def evaluate_only(args: argparse.Namespace, model: torch.nn.Module, val_loader, device: torch.device,
                  loaded_from: Path | None) -> dict[str, float]:
    """--eval: one pass over the val split with the resumed weights; a log.txt line."""
    if loaded_from is None:
        raise SystemExit('error: --eval needs a checkpoint of this script: --resume PATH (e.g. '
                         'checkpoint-best.pth), or checkpoint-last.pth / checkpoint-N.pth in --output_dir')
    stats = evaluate(model, val_loader, device, args.amp, args.dist_eval and dist.get_world_size() > 1)
    print(f'Accuracy of the network on the {stats["num_samples"]} test images: {stats["acc1"]:.1f}%')
    append_json_line(args.output_dir, {'mode': 'eval', 'checkpoint': str(loaded_from),
                                       **{f'test_{k}': v for k, v in stats.items()}})
    dist.destroy()
    return stats


def optimizer_and_resume(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                         make_optimizer: Callable[[], torch.optim.Optimizer], classes: Sequence[str]) -> tuple:
    """(optimizer, loss scaler, Resumed); with --eval no optimizer
    is built and only the weights are resumed. Shared by fine-tuning and linear probing.
    `classes`: the data's class names (resume checks them)."""
    optimizer = loss_scaler = None
    if not args.eval:
        optimizer = make_optimizer()
        loss_scaler = grad_scaler(args, device)
    return optimizer, loss_scaler, resume(args, model, optimizer, loss_scaler, classes)


def start_run(args: argparse.Namespace) -> torch.device:
    """setup(), then for a training run (not --eval) its lr and the run folder's lock, before
    the data, the model and the resume: a second start of the same command stops at once."""
    device = setup(args)
    if not args.eval:
        learning_rate(args)
        checkpoint.lock_run_folder(args.output_dir, args.log_dir)
    return device


def learning_rate(args: argparse.Namespace) -> int:
    """Sets args.lr from --blr when not given; returns the effective batch."""
    eff_batch = set_lr(args)
    print(f'base lr: {args.lr * 256 / eff_batch:.2e}  actual lr: {args.lr:.2e}  accum_iter: {args.accum_iter}  '
          f'effective batch: {eff_batch}  amp: {args.amp}')
    return eff_batch


def grad_scaler(args: argparse.Namespace, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if args.amp == 'fp16' else None


def make_schedule(args: argparse.Namespace, optimizer, train_loader, start_epoch: int) -> PlainSchedule:
    if start_epoch < args.epochs:  # a rerun that only evaluates the saved last epoch takes no step
        optimizer_steps_per_epoch(len(train_loader), args.accum_iter)
    return PlainSchedule(optimizer, args.lr, args.min_lr, args.warmup_epochs, args.epochs, len(train_loader),
                         args.accum_iter)


# ---- fine-tuning ----------------------------------------------------------------------------------

def build_criterion(args: argparse.Namespace):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_active(args):
        return SoftTargetCrossEntropy()  # mixup produces smoothed soft targets itself
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_mixup(args: argparse.Namespace):
    if not mixup_active(args):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    device = start_run(args)
    train_tf = finetune_train_transform(args.input_size, args.color_jitter, args.aa, args.reprob, args.remode,
                                        args.recount)
    train_loader, val_loader = build_data(args, train_tf, eval_transform(args.input_size), device)

    model = models_vit.build_model(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                                   drop_path_rate=args.drop_path, global_pool=args.global_pool)
    encoder = encoder_to_load(args, 'training from random initialisation')
    if encoder:
        load_pretrained_encoder(model, encoder, HEAD_INIT_STD, args.model)
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'number of trainable params (M): {n_parameters / 1e6:.2f}')

    def make_optimizer() -> torch.optim.Optimizer:
        groups = param_groups_lrd(model, args.weight_decay, model.no_weight_decay(), args.layer_decay)
        print('parameter groups:\n' + describe_groups(groups))
        return build_adamw(groups, args.lr, device, betas=(0.9, 0.999))

    optimizer, loss_scaler, resumed = optimizer_and_resume(args, model, device, make_optimizer,
                                                           val_loader.dataset.classes)
    if args.eval:
        return evaluate_only(args, model, val_loader, device, resumed.path)

    criterion = build_criterion(args)
    print(f'criterion: {type(criterion).__name__}' + ('  (mixup/cutmix on)' if mixup_active(args) else ''))
    return train_and_finish(args, model, criterion, train_loader, val_loader, optimizer, loss_scaler, device,
                            resumed, n_parameters, build_mixup(args))


def train_and_finish(args: argparse.Namespace, model: torch.nn.Module, criterion, train_loader, val_loader,
                     optimizer: torch.optim.Optimizer, loss_scaler, device: torch.device, resumed: Resumed,
                     n_parameters: int, mixup_fn=None) -> dict:
    """The epochs (engine_finetune.fit) with tensorboard, then the closing lines; shared by
    fine-tuning and linear probing."""
    start_epoch, loaded_from = resumed.start_epoch, resumed.path
    unevaluated = None  # this folder's checkpoint of an epoch whose evaluation did not reach log.txt
    if (resumed.train_stats is not None and checkpoint.continues_folder(args.output_dir, loaded_from)
            and dist.on_main(lambda: start_epoch - 1 not in logged_accuracies(args.output_dir))):
        unevaluated = (loaded_from, resumed.train_stats)
    if start_epoch >= args.epochs and unevaluated is None:  # a finished run relaunched (e.g. requeued)
        print(f'all {args.epochs} epochs are done (checkpoint {loaded_from}); raise --epochs to train more, or use '
              f'another --output_dir for a new run')
        dist.destroy()
        return {}
    continues = checkpoint.start_run_folder(args.output_dir, args.log_dir, start_epoch, loaded_from,
                                            keep=(loaded_from, getattr(args, 'finetune', None)))
    log_writer = make_writer(args.log_dir, start_epoch if continues else None)
    schedule = make_schedule(args, optimizer, train_loader, start_epoch)
    record = fit(ModelHandle(model, ddp_wrapper(args, device)), criterion, train_loader, val_loader, optimizer,
                 schedule, loss_scaler, device, args, start_epoch, n_parameters, save_checkpoint, mixup_fn, log_writer,
                 checkpoint_extra={'classes': list(val_loader.dataset.classes)}, unevaluated=unevaluated)
    if log_writer is not None:
        log_writer.close()
    if dist.is_main_process() and args.output_dir:
        print(f'outputs: {Path(args.output_dir).resolve()} (log.txt, checkpoint-best.pth, checkpoint-last.pth, '
              f'checkpoint-<epoch>.pth every --save_freq {args.save_freq} epochs)')
    dist.destroy()
    return record


if __name__ == '__main__':
    run_main(main, get_args_parser())
