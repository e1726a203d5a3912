"""The command-line flags that several scripts share, and the choices their flags offer, free of
torch: the scripts build their parsers from this module and answer --help and a refused flag
(`answer_before_imports`) before importing torch, timm and torchvision, which took most of the
6-8 s of such an answer on the 2-core development VM."""
from __future__ import annotations

import argparse
import os

from util.cli import USABLE_CPUS

# pretraining constructors in models_mim; each classifier in models_vit is the encoder of one
# (MIM_vit_X pretrains vit_X)
MIM_MODELS = ('MIM_vit_tiny_patch16', 'MIM_vit_small_patch16', 'MIM_vit_base_patch16', 'MIM_vit_large_patch16',
              'MIM_vit_huge_patch14')
VIT_MODELS = tuple(name[len('MIM_'):] for name in MIM_MODELS)

AMP_CHOICES = ('auto', 'bf16', 'fp16', 'none')  # --amp (util.runtime.resolve_device_and_amp)

# --data_backend (util.gpu_data) and --gpu_resample; resized_crop_batch also takes 'bilinear'
BACKENDS = ('pil', 'gpu', 'gpu-cache')
GPU_RESAMPLE_CHOICES = ('bicubic', 'pil')

# 10 loader workers per process (MAE's, and upstream LocalMIM fine-tuning's; its pretraining has
# 12), fewer where this process may use fewer cores
DEFAULT_NUM_WORKERS = min(10, USABLE_CPUS)


def answer_before_imports(parser: argparse.ArgumentParser) -> None:
    """Called in an entry script's `__main__` before its torch imports: --help and a flag that
    argparse refuses end here, at once. The script's `run_main` parses again (cheap) and runs.
    Under a launcher this is left to run_main, which also hands a flag error to the launcher's
    closing summary."""
    if not os.environ.get('TORCHELASTIC_ERROR_FILE'):
        parser.parse_args()


def add_dist_args(parser: argparse.ArgumentParser) -> None:
    """Upstream's distributed flags; `--local-rank` and `--local_rank` both accepted."""
    group = parser.add_argument_group('distributed (set by torch.distributed.launch / torchrun)')
    group.add_argument('--world_size', default=1, type=int,
                       help='number of processes; taken from the launcher when it sets WORLD_SIZE')
    group.add_argument('--local_rank', '--local-rank', dest='local_rank', default=-1, type=int,
                       help='set by torch.distributed.launch; do not pass by hand')
    group.add_argument('--dist_on_itp', action='store_true', help=argparse.SUPPRESS)
    group.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    group.add_argument('--dist_backend', default=None, choices=['nccl', 'gloo'],
                       help='default: nccl on CUDA, gloo on CPU')


def add_save_flags(group, save_freq: int, also: str = '') -> None:
    """--save_freq and --save_last_freq, for the scripts that train (their meaning is save_checkpoint's)."""
    group.add_argument('--save_freq', default=save_freq, type=int,
                       help=f'keep checkpoint-<epoch>.pth every N epochs and at the end{also}')
    group.add_argument('--save_last_freq', default=1, type=int,
                       help='refresh checkpoint-last.pth, the point a rerun resumes from, every N epochs (default: '
                            'every epoch); the last epoch and every --save_freq epoch are always written. Raise it '
                            'when epochs take seconds and checkpoints hundreds of MB (the study does)')


def check_save_flags(args: argparse.Namespace) -> None:
    if args.save_freq < 1 or args.save_last_freq < 1:
        raise SystemExit('error: --save_freq and --save_last_freq must be at least 1')


def add_run_args(parser: argparse.ArgumentParser, output_dir: str, trains: bool = True) -> None:
    """Data, output and process flags common to fine-tuning, linear probing and kNN (trains=False:
    the help says what they mean for a feature pass without a trained head)."""
    g = parser.add_argument_group('data, output, run')
    g.add_argument('--data_path', default='./dataset/ImageNet/', type=str,
                   help='dataset root with labelled splits: <path>/train/<class>/... and <path>/val/<class>/..., '
                        'or <path>/train/image_folders/<class>/... and <path>/val/image_folders/<class>/...')
    g.add_argument('--nb_classes', default=None, type=int,
                   help=('number of outputs of the head' if trains else 'classes the votes and the linear classifier '
                         'range over') + '; unset: the number of class folders in the train split')
    g.add_argument('--output_dir', default=output_dir,
                   help='folder for log.txt and checkpoints; empty for none' if trains else
                   'folder for log.txt (one JSON line per result) and, with --dump_features, knn_features.pth; '
                   'empty for none')
    g.add_argument('--device', default=None, help='cuda or cpu; unset: cuda when available')
    g.add_argument('--amp', default='auto', choices=list(AMP_CHOICES),
                   help='mixed precision: auto = bf16 on GPUs that support it, none on CPU; fp16 uses a GradScaler'
                   if trains else 'precision of the encoder\'s forward pass: auto = bf16 on GPUs that support it, '
                   'none on CPU (the linear classifier is fitted in float32)')
    g.add_argument('--seed', default=0, type=int,
                   help='random seed (each process adds its rank)' if trains else
                   'seed of the randomly initialised encoder evaluated without --finetune (the same on every '
                   'process; the linear classifier is always seeded with 0)')
    g.add_argument('--num_workers', default=DEFAULT_NUM_WORKERS, type=int,
                   help='data-loading processes per training process (default: 10, or the usable CPUs if fewer)')
    g.add_argument('--pin_mem', action='store_true', default=True,
                   help='pinned host memory for faster copies to the GPU (default on)')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='turn --pin_mem off')
    add_dist_args(parser)


def add_batch_args(parser: argparse.ArgumentParser, batch_size: int, epochs: int) -> None:
    """Batch, epochs and accumulation flags of the trained protocols (fine-tuning, linear probe)."""
    parser.add_argument('--batch_size', default=batch_size, type=int,
                        help='batch size per process (effective batch = batch_size * accum_iter * processes)')
    parser.add_argument('--epochs', default=epochs, type=int, help='training epochs')
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='micro-batches accumulated per optimizer step (raises the effective batch)')


def add_training_run_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the trained protocols (fine-tuning, linear probe): logging, resume, evaluation."""
    g = parser.add_argument_group('logging, checkpoints, evaluation')
    g.add_argument('--log_dir', default=None, help='tensorboard folder; unset: --output_dir')
    g.add_argument('--resume', default='',
                   help='checkpoint of this script to resume from (or to evaluate with --eval)')
    g.add_argument('--auto_resume', dest='auto_resume', action='store_true', default=True,
                   help='resume from checkpoint-last.pth / the newest checkpoint-N.pth in --output_dir '
                        '(default on)')
    g.add_argument('--no_auto_resume', dest='auto_resume', action='store_false', help='turn --auto_resume off')
    g.add_argument('--start_epoch', default=0, type=int, help='first epoch when not resuming')
    add_save_flags(g, 20, '; checkpoint-best.pth holds the best top-1 epoch')
    g.add_argument('--print_freq', default=50, type=int, help='console/tensorboard line every N iterations')
    g.add_argument('--eval', action='store_true',
                   help='only evaluate the checkpoint given by --resume (or found in --output_dir) on the val split')
    g.add_argument('--dist_eval', action='store_true', default=False,
                   help='split evaluation over the processes (each image once); otherwise every process '
                        'evaluates the whole val split')


def add_readout_args(parser: argparse.ArgumentParser, global_pool_default: bool) -> None:
    g = parser.add_argument_group('read-out').add_mutually_exclusive_group()  # both: refused, not "last wins"
    pool_default, cls_default = (' (default)', '') if global_pool_default else ('', ' (default)')
    g.add_argument('--global_pool', action='store_true', default=global_pool_default,
                   help='classify the mean of the patch tokens, normalised by its own fc_norm (the final norm '
                        f'is not used){pool_default}')
    g.add_argument('--cls_token', action='store_false', dest='global_pool', default=argparse.SUPPRESS,
                   help=f'classify the cls token after the final norm{cls_default}')


def add_model_args(parser: argparse.ArgumentParser, default: str, what: str,
                   finetune_help: str) -> argparse._ArgumentGroup:
    """--model, --input_size and --finetune (the pretraining checkpoint) of the evaluation scripts;
    returns the group for script-specific model flags."""
    g = parser.add_argument_group('model')
    g.add_argument('--model', default=default, type=str,
                   help=f'{what}: one of {", ".join(VIT_MODELS)} (the encoder of MIM_vit_X is vit_X)')
    g.add_argument('--input_size', default=224, type=int, help='image side in pixels')
    g.add_argument('--finetune', default='', help=finetune_help)
    return g
