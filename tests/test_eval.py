"""Linear probe and kNN: the kNN vote on a hand-computed toy set, accuracy counting, the probe's
head, and small runs of run_linprobe.py and run_knn.py (one process and two under torchrun)."""
from __future__ import annotations

import json
import math
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / 'ViT'
if str(VIT) not in sys.path:
    sys.path.insert(0, str(VIT))

import models_mim  # noqa: E402
from engine_finetune import evaluate, topk_correct  # noqa: E402
from run_knn import fit_linear_on_features, knn_classify, knn_correct  # noqa: E402
from helpers import run_script  # noqa: E402


@pytest.fixture(scope='session')
def pretrain_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / 'eval_pretrain_tiny32.pth'
    if not path.exists():
        torch.manual_seed(0)
        torch.save({'model': models_mim.MIM_vit_tiny_patch16(img_size=32).state_dict(), 'epoch': 0}, path)
    return path


# ---- kNN math ----------------------------------------------------------------------------------

# train: a=(1,0) class 0, b=(0,1) class 1, c=(1,1) class 1, d=(-1,0) class 2, e=(0,-3) class 0
TRAIN = torch.tensor([[1., 0.], [0., 1.], [1., 1.], [-1., 0.], [0., -3.]])
TRAIN_Y = torch.tensor([0, 1, 1, 2, 0])
# test: x=(2,0), y=(0,1), z=(-2,-1)
TEST = torch.tensor([[2., 0.], [0., 1.], [-2., -1.]])
T = 0.5
R2 = 2 ** -0.5  # cos(45 deg)


def test_knn_classify_hand_computed():
    scores = knn_classify(TRAIN, TRAIN_Y, TEST, k=2, T=T, num_classes=3)
    expected = torch.tensor([
        # x: nearest a (cos 1) and c (cos 1/sqrt2)
        [math.exp(1 / T), math.exp(R2 / T), 0.0],
        # y: nearest b (cos 1) and c (cos 1/sqrt2), both class 1
        [0.0, math.exp(1 / T) + math.exp(R2 / T), 0.0],
        # z: nearest d (cos 2/sqrt5, class 2) and e (cos 1/sqrt5, class 0)
        [math.exp(5 ** -0.5 / T), 0.0, math.exp(2 * 5 ** -0.5 / T)],
    ])
    assert torch.allclose(scores, expected, rtol=1e-5)
    assert scores.argmax(1).tolist() == [0, 1, 2]

    # k larger than the train set: every train sample votes
    all_votes = knn_classify(TRAIN, TRAIN_Y, TEST[:1], k=50, T=T, num_classes=3)
    x_expected = [math.exp(1 / T) + math.exp(0.0), math.exp(0.0) + math.exp(R2 / T), math.exp(-1 / T)]
    assert torch.allclose(all_votes[0], torch.tensor(x_expected), rtol=1e-5)

    # chunking does not change the result
    assert torch.allclose(knn_classify(TRAIN, TRAIN_Y, TEST, 2, T, 3, chunk_size=1), scores)

    # z's true class 0 is second: a top-1 miss, a top-5 (capped at 3 classes) hit
    assert knn_correct(scores, torch.tensor([0, 1, 0])) == (2, 3)

    # k = 1: one class gets a vote; the zero-score classes are not "top-5" candidates (capped at k)
    nearest = knn_classify(TRAIN, TRAIN_Y, TEST, k=1, T=T, num_classes=3)
    assert knn_correct(nearest, torch.tensor([0, 1, 0]), top=1) == (2, 2)
    assert knn_correct(nearest, torch.tensor([0, 1, 0])) == (2, 3)  # what the uncapped count would claim


def test_topk_correct_and_evaluate():
    logits = torch.tensor([[3., 2., 1., 0., -1., -2.],
                           [0., 1., 2., 3., 4., 5.],
                           [1., 0.5, 0.4, 0.3, 0.2, -1.]])
    targets = torch.tensor([0, 1, 5])
    c1, c5 = topk_correct(logits, targets)
    assert (int(c1), int(c5)) == (1, 2)

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, targets), batch_size=2)
    stats = evaluate(Identity(), loader, torch.device('cpu'))
    assert stats['acc1'] == pytest.approx(100 / 3) and stats['acc5'] == pytest.approx(200 / 3)
    assert stats['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    assert stats['num_samples'] == 3


# ---- linear probe ----------------------------------------------------------------------------------

def test_linprobe_head_is_bn_plus_linear_and_only_trainable_part(pretrain_ckpt):
    import run_linprobe
    args = run_linprobe.get_args_parser().parse_args(
        ['--model', 'vit_tiny_patch16', '--input_size', '32', '--finetune', str(pretrain_ckpt)])
    args.nb_classes = 4
    assert args.global_pool is False and args.blr == 0.1 and args.weight_decay == 0.0
    model = run_linprobe.build_probe(args)
    bn, linear = model.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert linear.weight.shape == (4, 192)
    assert 0.005 < linear.weight.std() < 0.02  # trunc_normal std 0.01
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'head.1.weight', 'head.1.bias'}


def test_linprobe_smoke(tmp_path, demo_data, pretrain_ckpt):
    out = tmp_path / 'lp'
    res = run_script(['run_linprobe.py', '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4',
                      '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0', '--device', 'cpu',
                      '--finetune', str(pretrain_ckpt), '--data_path', str(demo_data), '--output_dir', str(out)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines()]
    assert len(lines) == 1 and lines[0]['epoch'] == 0
    assert 0 <= lines[0]['test_acc1'] <= 100 and lines[0]['n_parameters'] == 192 * 4 + 4
    assert (out / 'checkpoint-best.pth').is_file()
    # --eval: no optimizer, the probe's weights resumed, one pass, the same accuracy
    res = run_script(['run_linprobe.py', '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4',
                      '--num_workers', '0', '--device', 'cpu', '--data_path', str(demo_data), '--output_dir', str(out),
                      '--eval', '--resume', str(out / 'checkpoint-best.pth')])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert last['mode'] == 'eval' and last['test_acc1'] == lines[0]['test_acc1']


def test_linprobe_batch_of_one_is_a_clear_error():
    import run_linprobe
    parse = run_linprobe.get_args_parser().parse_args
    with pytest.raises(SystemExit, match='BatchNorm1d needs at least 2 images'):
        run_linprobe.check_args(parse(['--model', 'vit_tiny_patch16', '--batch_size', '1']))
    run_linprobe.check_args(parse(['--model', 'vit_tiny_patch16', '--batch_size', '1', '--eval']))  # no training


# ---- kNN runs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('flags, message', [
    (['--nb_knn', '20', '0'], 'needs k >= 1'),
    (['--chunk_size', '0'], '--chunk_size must be >= 1'),
    (['--temperature', '0'], '--temperature must be >= 0.0125'),
    (['--temperature', 'nan'], '--temperature must be'),
    (['--linear_epochs', '-1'], '--linear_epochs must be >= 0'),
])
def test_knn_flags_that_would_fail_after_the_feature_pass_are_refused_first(flags, message):
    import run_knn
    args = run_knn.get_args_parser().parse_args(['--device', 'cpu', *flags])
    with pytest.raises(SystemExit, match=message):
        run_knn.check_knn_args(args)
    run_knn.check_knn_args(run_knn.get_args_parser().parse_args(['--device', 'cpu']))  # defaults pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('pretrained', [True, False])
def test_knn_script_single_and_two_processes(tmp_path, demo_data, pretrain_ckpt, pretrained):
    """Same features and accuracies from one process and from two; without --finetune (the
    random-encoder baseline) both ranks must build the same random encoder."""
    common = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '3', '--num_workers', '0',
              '--device', 'cpu', '--data_path', str(demo_data),
              '--nb_knn', '1', '20', '40', '--dump_features', '--linear_epochs', '3']
    common += ['--finetune', str(pretrain_ckpt)] if pretrained else []
    one, two = tmp_path / 'knn1', tmp_path / 'knn2'
    res = run_script(['run_knn.py', *common, '--output_dir', str(one)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = run_script(['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
                      'run_knn.py', *common, '--output_dir', str(two)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    assert '1-NN (T=0.07): top-1 ' in res.stdout and '20-NN (T=0.07): top-1 ' in res.stdout, res.stdout[-3000:]
    assert 'top-5' not in res.stdout and 'top-4 ' in res.stdout  # 1-NN: top-1 only; 4 classes: top-4

    lines = {d: [json.loads(l) for l in (d / 'log.txt').read_text().splitlines()] for d in (one, two)}
    assert [l['mode'] for l in lines[one]] == ['knn', 'knn', 'knn', 'linear']
    assert [l['k'] for l in lines[one][:3]] == [1, 20, 32]  # k above the 32 train images: all of them
    assert 'note: 40-NN asked for, but there are only 32 train images: 32-NN instead' in res.stdout
    assert lines[one][0]['acc5'] == lines[one][0]['acc1']  # 1-NN: top-5 capped at k
    for a, b in zip(lines[one], lines[two]):
        assert a['num_train'] == b['num_train'] == 32 and a['num_test'] == b['num_test'] == 8
        assert a['acc1'] == b['acc1'] and a['acc5'] == b['acc5'] and 0 <= a['acc1'] <= 100
    f1 = torch.load(one / 'knn_features.pth', weights_only=True)
    f2 = torch.load(two / 'knn_features.pth', weights_only=True)
    assert f1['train_feats'].shape == (32, 192)
    for k in ('train_feats', 'test_feats'):
        assert torch.allclose(f1[k], f2[k], atol=1e-4), k
    for k in ('train_labels', 'test_labels'):
        assert torch.equal(f1[k], f2[k]), k


def test_knn_two_processes_with_a_val_split_smaller_than_the_process_count(tmp_path, demo_data, pretrain_ckpt):
    """One val image for two processes: the second extracts no features, and still takes part."""
    data = tmp_path / 'data'
    shutil.copytree(demo_data, data)
    val_images = sorted((data / 'val').rglob('*.jpg'))
    for extra in val_images[1:]:
        extra.unlink()
    res = run_script(['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
                      'run_knn.py', '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4',
                      '--num_workers', '0', '--device', 'cpu', '--finetune', str(pretrain_ckpt), '--data_path',
                      str(data), '--nb_knn', '5', '--linear_epochs', '1', '--dump_features', '--output_dir',
                      str(tmp_path / 'knn')])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / 'knn' / 'log.txt').read_text().splitlines()]
    assert [(l['mode'], l['num_test']) for l in lines] == [('knn', 1), ('linear', 1)]
    assert torch.load(tmp_path / 'knn' / 'knn_features.pth', weights_only=True)['test_feats'].shape == (1, 192)


def test_linear_classifier_on_fixed_features_separates_a_toy_set():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 4
    labels = torch.arange(3).repeat_interleave(40)
    feats = centres[labels] + torch.randn(120, 16, generator=gen) + 100.0  # far from the origin
    scores = fit_linear_on_features(feats[::2], labels[::2], feats[1::2], num_classes=3, epochs=30, batch_size=16)
    assert scores.shape == (60, 3)
    assert (scores.argmax(1) == labels[1::2]).float().mean() == 1.0
    again = fit_linear_on_features(feats[::2], labels[::2], feats[1::2], num_classes=3, epochs=30, batch_size=16)
    assert torch.equal(scores, again)  # seeded: every process fits the same classifier
    # with 0 epochs the head is its near-zero init: training lowered the val loss a lot
    untrained = fit_linear_on_features(feats[::2], labels[::2], feats[1::2], num_classes=3, epochs=0)
    ce = torch.nn.functional.cross_entropy
    assert ce(scores, labels[1::2]) < 0.2 * ce(untrained, labels[1::2])


def test_evaluation_counts_are_summed_exactly_over_ranks(monkeypatch):
    """7 ranks, 61 val images: a mean over ranks times 7 gave 60.99999999999999, logged as 60."""
    import engine_finetune
    from util import dist

    def seven_ranks_sum(x):  # this rank's sums, plus six ranks that had none
        return x.clone()
    monkeypatch.setattr(dist, 'is_dist', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 7)
    monkeypatch.setattr(dist.dist, 'all_reduce', seven_ranks_sum)
    sums = torch.tensor([0.0, 30.0, 50.0, 61.0], dtype=torch.float64)
    assert dist.all_reduce_sum(sums).tolist() == [0.0, 30.0, 50.0, 61.0]
    loader = [(torch.eye(4)[torch.arange(61) % 4], torch.arange(61) % 4)]
    stats = engine_finetune.evaluate(torch.nn.Identity(), loader, torch.device('cpu'), sharded=True)
    assert stats['num_samples'] == 61 and stats['acc1'] == 100.0


def test_knn_nb_classes_below_the_class_folders_is_an_error(tmp_path, demo_data, monkeypatch):
    import run_knn
    for var in ('RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(var, raising=False)
    args = run_knn.get_args_parser().parse_args(
        ['--model', 'vit_tiny_patch16', '--input_size', '32', '--device', 'cpu', '--num_workers', '0',
         '--data_path', str(demo_data), '--nb_classes', '2', '--output_dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='--nb_classes 2 is smaller than the 4 classes'):
        run_knn.main(args)


def test_knn_feature_pass_prints_progress(tmp_path, demo_data, pretrain_ckpt, monkeypatch, capsys):
    """Progress lines while the features are extracted (minutes on ImageNet), at most every
    PROGRESS_EVERY_S (here 0: after every batch but a split's last, which the closing line covers);
    none on a pass shorter than that."""
    import run_knn
    import util.log
    for var in ('RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(var, raising=False)
    args = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--device', 'cpu', '--num_workers', '0',
            '--batch_size', '8', '--data_path', str(demo_data), '--finetune', str(pretrain_ckpt)]
    monkeypatch.setattr(util.log, 'PROGRESS_EVERY_S', 0.0)
    run_knn.main(run_knn.get_args_parser().parse_args([*args, '--output_dir', str(tmp_path / 'a')]))
    progress = [line for line in capsys.readouterr().out.splitlines() if re.match(r'features: \w+ \d', line)]
    assert progress == [f'features: train {n}/32 images (0:00:00)' for n in (8, 16, 24)]  # val: 8 images, 1 batch
    monkeypatch.setattr(util.log, 'PROGRESS_EVERY_S', 10.0)
    run_knn.main(run_knn.get_args_parser().parse_args([*args, '--output_dir', str(tmp_path / 'b')]))
    assert not [line for line in capsys.readouterr().out.splitlines() if re.match(r'features: \w+ \d', line)]


def test_knn_help_speaks_of_a_feature_pass_not_of_training():
    """run_knn shares the data/run flags with fine-tuning; its help says what they mean for kNN."""
    import run_finetune
    import run_knn

    def helps(parser):
        return {a.dest: a.help for a in parser._actions}

    knn, finetune = helps(run_knn.get_args_parser()), helps(run_finetune.get_args_parser())
    assert 'checkpoints' in finetune['output_dir'] and 'checkpoints' not in knn['output_dir']
    assert 'knn_features.pth' in knn['output_dir']
    assert 'GradScaler' in finetune['amp'] and 'GradScaler' not in knn['amp']
    assert 'adds its rank' in finetune['seed'] and 'same on every process' in knn['seed']
