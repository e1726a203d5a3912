"""Linear probing of a pretrained encoder (MAE's protocol, with SGD instead of LARS).

The encoder is frozen; a linear classifier is trained on its feature (the cls token after the
final norm by default, the fc_norm'ed mean of the patch tokens with --global_pool), behind a
BatchNorm1d without affine parameters (eps 1e-6), which only standardises the features.
Optimiser: SGD, momentum 0.9, weight decay 0, lr = blr * effective batch / 256 with blr 0.1,
linear warmup then cosine to --min_lr, per iteration; augmentation: RandomResizedCrop + flip.
MAE uses LARS (90 epochs, batch 16384, blr 0.1); SGD with momentum is the usual substitute at
ordinary batch sizes.

    python run_linprobe.py --model vit_base_patch16 --finetune /path/checkpoint-99.pth \
        --data_path /path/to/imagenet --output_dir linprobe_out/
    torchrun --nproc_per_node=4 run_linprobe.py ... --dist_eval
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
import argparse

from util.cli import ArgumentParser
from util.flags import (add_batch_args, add_model_args, add_readout_args, add_run_args, add_training_run_args,
                        answer_before_imports)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description='Linear probing of a pretrained ViT encoder')
    add_batch_args(parser, batch_size=512, epochs=90)

    add_model_args(parser, 'vit_base_patch16', 'encoder',
                   'pretraining checkpoint whose encoder is probed (ours or LocalMIM\'s release); '
                   'without it a randomly initialised encoder is probed (a baseline)')
    add_readout_args(parser, global_pool_default=False)

    g = parser.add_argument_group('optimisation (SGD with momentum on the linear head)')
    g.add_argument('--weight_decay', type=float, default=0.0, help='SGD weight decay of the head weight')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--lr', type=float, default=None, help='absolute peak lr; unset: blr * effective batch / 256')
    g.add_argument('--blr', type=float, default=0.1, help='base lr: lr = blr * effective batch / 256')
    g.add_argument('--min_lr', type=float, default=0.0, help='lr at the end of the cosine')
    g.add_argument('--warmup_epochs', type=float, default=10, help='epochs of linear lr warmup (per iteration)')

    add_run_args(parser, output_dir='./output_linprobe')
    add_training_run_args(parser)
    return parser


if __name__ == '__main__':
    answer_before_imports(get_args_parser())

# the rest of the imports load torch, timm and torchvision (seconds): after the parser, so that
# --help and a refused flag are answered without them
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import models_vit  # noqa: E402
from run_finetune import (build_data, check_common_args, encoder_to_load, evaluate_only,  # noqa: E402
                          optimizer_and_resume, start_run, train_and_finish)
from util.runtime import run_main  # noqa: E402
from util.data import eval_transform, linprobe_train_transform  # noqa: E402
from util.encoder_loading import load_pretrained_encoder  # noqa: E402
from util.optim import param_groups_weight_decay  # noqa: E402

HEAD_INIT_STD = 0.01  # MAE's linear-probe head init (MoCo v3)


def build_probe(args: argparse.Namespace) -> models_vit.VisionTransformer:
    """Classifier with the pretrained encoder frozen and a BatchNorm1d + Linear head."""
    model = models_vit.build_model(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                                   global_pool=args.global_pool)
    encoder = encoder_to_load(args, 'probing a randomly initialised encoder')
    if encoder:
        load_pretrained_encoder(model, encoder, HEAD_INIT_STD, args.model)
    # standardises the features so one lr suits every encoder
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith('head.'))
    return model


def check_args(args: argparse.Namespace) -> None:
    check_common_args(args)
    if not 0.0 <= args.momentum < 1.0:
        raise SystemExit(f'error: --momentum must be in [0, 1), got {args.momentum}')
    if args.batch_size < 2 and not args.eval:
        raise SystemExit('error: the probe\'s BatchNorm1d needs at least 2 images per process and step: '
                         '--batch_size must be at least 2')


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    device = start_run(args)
    train_loader, val_loader = build_data(args, linprobe_train_transform(args.input_size),
                                          eval_transform(args.input_size), device)
    model = build_probe(args).to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'trainable params (head): {n_parameters}')

    optimizer, loss_scaler, resumed = optimizer_and_resume(
        args, model, device, lambda: torch.optim.SGD(param_groups_weight_decay(model, args.weight_decay),
                                                     lr=args.lr, momentum=args.momentum),
        val_loader.dataset.classes)
    if args.eval:
        return evaluate_only(args, model, val_loader, device, resumed.path)

    return train_and_finish(args, model, nn.CrossEntropyLoss(), train_loader, val_loader, optimizer, loss_scaler,
                            device, resumed, n_parameters)


if __name__ == '__main__':
    run_main(main, get_args_parser())
