"""Weighted k-nearest-neighbour classification on frozen encoder features (DINO's protocol).

Features of the train and val splits (evaluation transform: resize, centre crop) are
L2-normalised; each val image takes the k train images of highest cosine similarity s, each
voting for its class with weight exp(s / T); the class with the most weight wins. Defaults
k = 20, T = 0.07. Feature: the cls token after the final norm, or with --global_pool the
fc_norm'ed mean of the patch tokens. These norms are at init, i.e. plain standardisation: the
pretraining model's LayerNorm on the last block (`norm.3`, read by LocalMIM's last decoder) is
not loaded into them, as in upstream's fine-tuning.

Distributed: each process extracts its share of both splits; train features are gathered on
every process, each process classifies its own val share, and the counts are summed.

    python run_knn.py --model vit_base_patch16 --finetune /path/checkpoint-99.pth \
        --data_path /path/to/imagenet --output_dir knn_out/
    torchrun --nproc_per_node=4 run_knn.py ...
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
import argparse
import time
from pathlib import Path

from util.cli import ArgumentParser
from util.flags import add_model_args, add_readout_args, add_run_args, answer_before_imports


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description='Weighted kNN evaluation of a pretrained ViT encoder')
    parser.add_argument('--batch_size', default=128, type=int, help='images per forward pass per process')
    add_model_args(parser, 'vit_base_patch16', 'encoder',
                   'pretraining checkpoint whose encoder is evaluated (ours or LocalMIM\'s release); '
                   'without it a randomly initialised encoder is evaluated (a baseline)')
    add_readout_args(parser, global_pool_default=False)
    g = parser.add_argument_group('kNN')
    g.add_argument('--nb_knn', default=[20], type=int, nargs='+',
                   help='number of neighbours k; several values give one result each')
    g.add_argument('--temperature', default=0.07, type=float,
                   help='T in the vote weight exp(cos_sim / T); at least 0.0125 (float32 range)')
    g.add_argument('--chunk_size', default=256, type=int,
                   help='val images compared with all train features at once (memory: chunk x train images)')
    g.add_argument('--linear_epochs', default=0, type=int,
                   help='also fit a linear classifier for N epochs (0: none) on the same frozen, unaugmented '
                        'features (standardised, SGD): a fast stand-in for run_linprobe.py, logged as mode "linear"')
    g.add_argument('--dump_features', action='store_true',
                   help='also save the features and labels of both splits (dataset order) to '
                        '<output_dir>/knn_features.pth')
    add_run_args(parser, output_dir='./output_knn', trains=False)
    return parser


if __name__ == '__main__':
    answer_before_imports(get_args_parser())

# the rest of the imports load torch, timm and torchvision (seconds): after the parser, so that
# --help and a refused flag are answered without them
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models_vit  # noqa: E402
from engine_finetune import extract_features, gather_in_dataset_order  # noqa: E402
from run_finetune import check_common_args  # noqa: E402
from util.runtime import run_main, setup  # noqa: E402
from util import dist  # noqa: E402
from util.data import build_classification_datasets, build_eval_loader, eval_transform  # noqa: E402
from util.encoder_loading import load_pretrained_encoder  # noqa: E402
from util.log import PassProgress, append_json_line, format_seconds  # noqa: E402


MIN_TEMPERATURE = 0.0125  # exp(1 / T) stays below float32's largest value (exp(88.7))


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
                 T: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Class scores (n_test, num_classes) of weighted kNN.

    Features are L2-normalised here; the score of class c for a test sample is the sum of
    exp(cos_sim / T) over its k most similar train samples of class c (k is capped at the
    number of train samples). Test samples are processed `chunk_size` at a time, so memory
    is chunk_size x n_train similarities."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, train.shape[0])
    labels = train_labels.long()
    scores = []
    for chunk in test.split(chunk_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)  # (b, k)
        weights = (sim / T).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        scores.append(votes.scatter_add_(1, labels[idx], weights))
    if not scores:
        return torch.zeros(0, num_classes, device=test.device)
    return torch.cat(scores)


def fit_linear_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                           num_classes: int, epochs: int, batch_size: int = 256, blr: float = 0.1,
                           seed: int = 0) -> torch.Tensor:
    """Class scores (n_test, num_classes) of a linear classifier trained on fixed features: the
    features standardised with the train set's mean/std (what the probe's BatchNorm1d without
    affine does), then Linear trained by SGD (momentum 0.9, lr = blr * batch / 256, cosine to 0,
    no weight decay). Seeded, so every process fits the same classifier."""
    gen = torch.Generator(device='cpu').manual_seed(seed)
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    x_train, x_test = (train_feats - mean) / std, (test_feats - mean) / std
    head = torch.nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen).mul_(0.01))
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=blr * batch_size / 256, momentum=0.9)
    steps = max(epochs * ((x_train.shape[0] + batch_size - 1) // batch_size), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=gen).to(x_train.device)
        for idx in order.split(batch_size):
            loss = F.cross_entropy(head(x_train[idx]), train_labels[idx].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
    with torch.no_grad():
        return head(x_test)


def knn_correct(scores: torch.Tensor, labels: torch.Tensor, top: int = 5) -> tuple[int, int]:
    """(top-1 hits, top-`top` hits), `top` capped at the number of classes. kNN passes min(5, k):
    at most k classes get votes, and the zero-score rest would fill top-5 in arbitrary order."""
    if scores.shape[0] == 0:
        return 0, 0
    top = scores.topk(min(top, scores.shape[1]), dim=1).indices
    hit = top.eq(labels[:, None])
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


def accuracy_record(scores: torch.Tensor, labels: torch.Tensor, device: torch.device, top: int = 5) -> dict:
    """Top-1 / top-5 (percent; top-`top` for kNN with k < 5) over every process's share of the val set."""
    top1, top5 = knn_correct(scores, labels, top)
    counts = torch.tensor([top1, top5, labels.shape[0]], dtype=torch.float64, device=device)
    top1, top5, n = dist.all_reduce_sum(counts).tolist()
    return {'acc1': 100.0 * top1 / max(n, 1), 'acc5': 100.0 * top5 / max(n, 1), 'num_test': int(n)}


def check_knn_args(args: argparse.Namespace) -> None:
    """Refuses kNN flags that would fail (or mean nothing) only after the long feature pass."""
    if min(args.nb_knn) < 1:
        raise SystemExit(f'error: --nb_knn needs k >= 1, got {args.nb_knn}')
    if args.chunk_size < 1:
        raise SystemExit(f'error: --chunk_size must be >= 1, got {args.chunk_size}')
    if args.linear_epochs < 0:
        raise SystemExit(f'error: --linear_epochs must be >= 0 (0: no linear classifier), got {args.linear_epochs}')
    if not args.temperature >= MIN_TEMPERATURE:  # also catches nan
        raise SystemExit(f'error: --temperature must be >= {MIN_TEMPERATURE} (the vote weight exp(cos_sim / T) '
                         f'overflows float32 below it), got {args.temperature}')


def main(args: argparse.Namespace) -> list[dict]:
    check_common_args(args)
    check_knn_args(args)
    device = setup(args)
    transform = eval_transform(args.input_size)
    world, rank = dist.get_world_size(), dist.get_rank()
    train_set, val_set = build_classification_datasets(args.data_path, transform, transform)
    if args.nb_classes is not None and args.nb_classes < len(train_set.classes):
        raise SystemExit(f'error: --nb_classes {args.nb_classes} is smaller than the {len(train_set.classes)} '
                         f'classes of {train_set.root}')
    num_classes = max(args.nb_classes or 0, len(train_set.classes))
    pin = args.pin_mem and device.type == 'cuda'
    # every process extracts its own share of both splits
    train_loader = build_eval_loader(train_set, args.batch_size, args.num_workers, pin, world, rank)
    val_loader = build_eval_loader(val_set, args.batch_size, args.num_workers, pin, world, rank)
    print(f'data: train {train_set.root} ({len(train_set)} images), val {val_set.root} ({len(val_set)} images), '
          f'{len(train_set.classes)} classes')

    # one initialisation on every rank (setup seeds each rank differently): without --finetune
    # the random encoder must be the same one for every shard of the features
    torch.manual_seed(args.seed)
    model = models_vit.build_model(args.model, img_size=args.input_size, num_classes=0, global_pool=args.global_pool)
    if args.finetune:
        load_pretrained_encoder(model, args.finetune, 0.0, args.model)
    else:
        print('note: no --finetune given; evaluating a randomly initialised encoder')
    model.to(device).eval()

    start = time.time()
    dim = model.num_features
    # progress lines on a long pass (minutes on ImageNet); the line below closes it
    train_feats, train_labels = extract_features(model.forward_pooled, PassProgress(train_loader, 'features: train'),
                                                 device, dim, args.amp, gather=True)
    test_feats, test_labels = extract_features(model.forward_pooled, PassProgress(val_loader, 'features: val'),
                                               device, dim, args.amp, gather=False)
    print(f'features: train {tuple(train_feats.shape)}, val (this process) {tuple(test_feats.shape)} '
          f'in {format_seconds(time.time() - start)}')

    if args.dump_features:
        all_test = gather_in_dataset_order(test_feats, test_labels, val_loader.sampler)
        if args.output_dir and dist.is_main_process():
            path = Path(args.output_dir) / 'knn_features.pth'
            torch.save({'train_feats': train_feats.cpu(), 'train_labels': train_labels.cpu(),
                        'test_feats': all_test[0].cpu(), 'test_labels': all_test[1].cpu(),
                        'classes': train_set.classes}, path)
            print(f'features saved to {path}')

    records = []
    for asked in args.nb_knn:
        k = min(asked, train_feats.shape[0])
        if k < asked:
            print(f'note: {asked}-NN asked for, but there are only {k} train images: {k}-NN instead')
        scores = knn_classify(train_feats, train_labels, test_feats, k, args.temperature, num_classes,
                              args.chunk_size)
        top = min(5, k, num_classes)  # at most k classes get votes
        record = {'mode': 'knn', 'k': k, 'temperature': args.temperature,
                  **accuracy_record(scores, test_labels, device, top=top),
                  'num_train': int(train_feats.shape[0]),
                  'global_pool': args.global_pool, 'checkpoint': args.finetune, 'model': args.model}
        print(f'{k}-NN (T={args.temperature}): top-1 {record["acc1"]:.2f}%  '
              + (f'top-{top} {record["acc5"]:.2f}%  ' if top > 1 else '') +
              f'({record["num_test"]} val images, {record["num_train"]} train images)')
        append_json_line(args.output_dir, record)
        records.append(record)
    if args.linear_epochs > 0:
        # every process fits the same seeded classifier on all train features; scored on its val share
        scores = fit_linear_on_features(train_feats, train_labels, test_feats, num_classes, args.linear_epochs)
        record = {'mode': 'linear', 'epochs': args.linear_epochs, **accuracy_record(scores, test_labels, device),
                  'num_train': int(train_feats.shape[0]), 'global_pool': args.global_pool,
                  'checkpoint': args.finetune, 'model': args.model}
        print(f'linear classifier on frozen features ({args.linear_epochs} epochs): top-1 {record["acc1"]:.2f}%  '
              f'top-{min(5, num_classes)} {record["acc5"]:.2f}%')
        append_json_line(args.output_dir, record)
        records.append(record)
    if dist.is_main_process() and args.output_dir:
        print(f'results appended to {Path(args.output_dir).resolve() / "log.txt"}')
    dist.destroy()
    return records


if __name__ == '__main__':
    run_main(main, get_args_parser(), resumable=False)
