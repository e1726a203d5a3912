"""util.log: the epoch bookkeeping behind the console lines and log.txt."""
import pytest
import torch

from util.log import EpochProgress, PassProgress, make_writer


def test_epoch_stats_average_loss_and_lr_over_the_epoch():
    """log.txt's train_loss and train_lr are epoch means, as upstream's meters (lr: the lr each
    iteration trained with, not the last one)."""
    progress = EpochProgress(epoch=0, iterations=4, print_freq=2)
    for it, (lr, loss) in enumerate([(1e-3, 4.0), (2e-3, 3.0), (3e-3, 2.0), (4e-3, 1.0)]):
        progress.update(8, lr, loss=torch.tensor(loss))
        if progress.due(it):
            window = progress.report(it)
            assert window['loss'] == pytest.approx(3.5 if it == 1 else 1.5)
    stats = progress.epoch_stats()
    assert stats['lr'] == pytest.approx(2.5e-3) and stats['loss'] == pytest.approx(2.5)
    assert stats['images_per_s'] > 0


def test_non_finite_loss_stops_at_the_next_report():
    progress = EpochProgress(epoch=3, iterations=10, print_freq=2)
    progress.update(8, 1e-3, loss=torch.tensor(1.0))
    progress.update(8, 1e-3, loss=torch.tensor(float('nan')))
    with pytest.raises(SystemExit, match='loss is nan at epoch 3 iteration 1'):
        progress.report(1)


def test_pass_progress_passes_the_batches_through_with_lines_at_most_every_interval(monkeypatch, capsys):
    import util.log
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(10, 1), torch.arange(10)),
                                         batch_size=4)
    progress = PassProgress(loader, 'features: train')
    assert len(progress) == 3 and progress.sampler is loader.sampler  # what extract_features reads
    assert [batch[1].tolist() for batch in progress] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert capsys.readouterr().out == ''  # a pass shorter than PROGRESS_EVERY_S prints nothing
    monkeypatch.setattr(util.log, 'PROGRESS_EVERY_S', 0.0)
    list(progress)
    assert capsys.readouterr().out == 'features: train 4/10 images (0:00:00)\nfeatures: train 8/10 images (0:00:00)\n'


def test_a_missing_tensorboard_is_an_error_line_not_an_import_traceback(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as if tensorboard were not installed
    with pytest.raises(SystemExit, match=r'^error: tensorboard is not installed: python3 -m pip install tensorboard '
                                         r'\(or -r requirements.txt\)'):
        make_writer(str(tmp_path))
    assert make_writer(None) is None  # no --log_dir: no tensorboard needed


def test_a_missing_tensorboard_stops_a_run_before_it_touches_its_folder(tmp_path, demo_data, monkeypatch):
    """setup() checks for tensorboard when there is a --log_dir: the run stops before the data
    set-up and before a fresh start sets the folder's earlier run aside, not after both."""
    import sys
    import run_pretrain
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.txt').write_text('{"epoch": 0}\n')
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    args = run_pretrain.get_args_parser().parse_args([
        '--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--batch_size', '4', '--epochs', '1',
        '--warmup_epochs', '0', '--num_workers', '0', '--device', 'cpu', '--data_path', str(demo_data),
        '--output_dir', str(out), '--no_auto_resume'])
    with pytest.raises(SystemExit, match='^error: tensorboard is not installed'):
        run_pretrain.main(args)
    assert [p.name for p in out.iterdir()] == ['log.txt']


def test_eval_needs_no_tensorboard(tmp_path, demo_data, monkeypatch):
    """--eval writes no tensorboard events, so a missing tensorboard does not stop it: here it
    gets as far as asking for the checkpoint to evaluate."""
    import sys
    import run_finetune
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    args = run_finetune.get_args_parser().parse_args([
        '--model', 'vit_tiny_patch16', '--input_size', '32', '--num_workers', '0', '--device', 'cpu',
        '--data_path', str(demo_data), '--output_dir', str(tmp_path / 'eval'), '--eval'])
    with pytest.raises(SystemExit, match='^error: --eval needs a checkpoint'):
        run_finetune.main(args)


def test_run_eta_weighs_the_epochs_left_by_their_cost_at_the_recent_pace():
    """Time left = the remaining epochs' costs at the seconds per unit of cost of the last 3 timed
    epochs, leaving out the process's first epoch (worker start-up) once another is timed."""
    from util.log import RunEta
    eta = RunEta(6, [4, 4, 2, 2, 1, 1])
    assert eta.seconds_left(0, 100.0) == pytest.approx(25 * 10)  # only the first so far: 25 s per unit
    assert eta.seconds_left(1, 40.0) == pytest.approx(10 * 6)   # epoch 0 left out: 10 s per unit
    assert eta.seconds_left(2, 30.0) == pytest.approx(70 / 6 * 4)
    assert eta.seconds_left(3, 20.0) == pytest.approx(90 / 8 * 2)
    assert eta.seconds_left(4, 4.0) == pytest.approx(54 / 5 * 1)  # epochs 2-4: the window of 3
    assert eta.seconds_left(5, 4.0) == 0.0
    resumed = RunEta(4)  # equal costs; a resumed process starts timing at its first epoch
    assert resumed.seconds_left(2, 9.0) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        RunEta(3, [1.0, 2.0])
    line = RunEta(3)
    assert line.progress(0, 70.0) == '1 of 3 epochs done, run eta 0:02:20'
    assert line.progress(1, 50.0) == '2 of 3 epochs done, run eta 0:00:50'
    assert line.progress(2, 50.0) == '3 of 3 epochs done'


def test_the_start_line_says_which_epochs_a_resumed_run_has_left():
    from util.log import start_line
    assert start_line(12, 0) == 'Start training for 12 epochs'  # upstream's line
    assert start_line(12, 8) == 'Start training: epochs 8-11 of 12 (4 left, epochs numbered from 0)'
