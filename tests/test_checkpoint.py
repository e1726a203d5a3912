"""util.checkpoint: which epochs write what."""
import argparse

import pytest
import torch

from util import checkpoint


def test_save_last_freq_and_save_freq(tmp_path, monkeypatch):
    written, kept = [], []
    monkeypatch.setattr(checkpoint, 'save_atomic', lambda obj, path: written.append(obj['epoch']))
    monkeypatch.setattr(checkpoint, 'keep_copy', lambda src, dst: kept.append(dst.name))
    args = argparse.Namespace(output_dir=str(tmp_path), epochs=7, save_freq=5, save_last_freq=2)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(args.epochs):
        checkpoint.save_checkpoint(args, model, optimizer, None, epoch, extra={'frozen': {'num_frozen': 0}})
    # checkpoint-last: every 2nd epoch (1, 3, 5), and the epochs that keep a numbered copy (0, 5, 6)
    assert written == [0, 1, 3, 5, 6]
    assert kept == ['checkpoint-0.pth', 'checkpoint-5.pth', 'checkpoint-6.pth']


def test_save_flags_are_checked():
    parser = argparse.ArgumentParser()
    checkpoint.add_save_flags(parser, 20)
    args = parser.parse_args([])
    assert (args.save_freq, args.save_last_freq) == (20, 1)
    checkpoint.check_save_flags(args)
    for flags in (['--save_freq', '0'], ['--save_last_freq', '0']):
        with pytest.raises(SystemExit, match='at least 1'):
            checkpoint.check_save_flags(parser.parse_args(flags))


def test_write_text_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    from util.checkpoint import write_text_atomic
    path = tmp_path / 'results.json'
    write_text_atomic(path, 'old')
    write_text_atomic(path, 'new')
    assert path.read_text() == 'new' and [p.name for p in tmp_path.iterdir()] == ['results.json']
