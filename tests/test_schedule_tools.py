"""estimate_speedup.py and plot_lr_schedule.py: run_pretrain's flags in, an estimate or a figure out."""
import pytest

import estimate_speedup
import plot_lr_schedule


def test_estimate_speedup_both_decoder_modes():
    result = estimate_speedup.main(['--model', 'MIM_vit_base_patch16', '--how_scale', 'cubic', '--t_0', '0.8'])
    assert set(result) == {'tap', 'never'}
    for r in result.values():
        assert 0 < r['saving'] < 1 and r['speedup'] == pytest.approx(1 / (1 - r['saving']), rel=1e-6)
    assert result['tap']['saving'] > result['never']['saving']  # dropped decoders save more


@pytest.mark.parametrize('flags, message', [
    ([], 'give --t_0'),
    (['--t_0', '0.5', '--how_scale', 'cubic', '--epochs', '10', '--warmup_epochs', '2'], 'inside the warmup'),
    (['--t_0', '0.8', '--model', 'MIM_vit_nope'], 'unknown --model MIM_vit_nope'),
    (['--t_0', '0.8', '--input_size', '40'], 'not a multiple of the patch size'),
])
def test_estimate_speedup_refuses_what_run_pretrain_refuses(flags, message):
    with pytest.raises(SystemExit, match=message):
        estimate_speedup.main(flags)


def test_plot_lr_schedule_writes_a_figure(tmp_path):
    out = plot_lr_schedule.main(['--t_0', '0.8', '--how_scale', 'cubic', '--epochs', '100', '--warmup_epochs', '10',
                                 '--points', '200', '--out', str(tmp_path / 'lr.png')])
    assert out == tmp_path / 'lr.png' and out.stat().st_size > 5000
    with pytest.raises(SystemExit, match='unknown --model'):
        plot_lr_schedule.main(['--t_0', '0.8', '--model', 'MIM_vit_nope', '--out', str(tmp_path / 'x.png')])


def test_plot_lr_schedule_writes_into_the_current_folder_by_default(tmp_path, monkeypatch):
    """Not into image/, whose figures the README shows."""
    monkeypatch.chdir(tmp_path)
    out = plot_lr_schedule.main(['--t_0', '0.5', '--how_scale', 'linear', '--epochs', '10',
                                 '--warmup_epochs', '1', '--points', '50'])
    assert out.resolve() == tmp_path / 'freezeout_lr_linear_0.5.png' and out.is_file()


@pytest.mark.parametrize('tool, listed, left_out', [
    (estimate_speedup, ['--t_0', '--how_scale', '--model', '--input_size', '--mask_ratio', '--json', '--epochs'],
     ['--blr', '--data_backend', '--output_dir', '--scale_lr']),
    (plot_lr_schedule, ['--t_0', '--how_scale', '--epochs', '--warmup_epochs', '--blr', '--scale_lr', '--out',
                        '--world_size'],
     ['--input_size', '--data_backend', '--output_dir', '--mask_ratio']),
])
def test_help_lists_only_the_flags_the_tool_reads_and_a_whole_pretraining_command_still_parses(
        tool, listed, left_out, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tool.main(['--help'])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for flag in listed:
        assert f'{flag} ' in text or f'{flag}]' in text, flag
    for flag in left_out:
        assert f'{flag} ' not in text and f'{flag}]' not in text, flag
    # the research notes' style of command, pasted whole
    tool.main(['--model', 'MIM_vit_small_patch16', '--t_0', '0.8', '--how_scale', 'cubic', '--epochs', '100',
               '--warmup_epochs', '10', '--data_path', 'nowhere', '--output_dir', str(tmp_path / 'o'),
               '--num_workers', '3', '--data_backend', 'pil', '--points', '20', '--out', str(tmp_path / 'lr.png')]
              if tool is plot_lr_schedule else
              ['--model', 'MIM_vit_small_patch16', '--t_0', '0.8', '--epochs', '100', '--warmup_epochs', '10',
               '--data_path', 'nowhere', '--output_dir', str(tmp_path / 'o'), '--num_workers', '3'])


def test_plot_lr_schedule_counts_the_processes_of_a_pasted_multi_gpu_command(tmp_path, capsys):
    """The research notes' 4-GPU FreezeOut command: lr = 2e-4 x (256 x 2 x 4) / 256, as the run has."""
    plot_lr_schedule.main(['--epochs', '100', '--batch_size', '256', '--warmup_epochs', '10', '--blr', '2e-4',
                           '--world_size', '4', '--accum_iter', '2', '--model', 'MIM_vit_base_patch16',
                           '--how_scale', 'linear', '--t_0', '0.5', '--points', '50', '--out', str(tmp_path / 'p.png')])
    assert 'lr 0.0016 = blr x effective batch 2048 / 256' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='--world_size must be at least 1'):
        plot_lr_schedule.main(['--t_0', '0.5', '--world_size', '0', '--out', str(tmp_path / 'q.png')])


def test_plot_lr_schedule_refuses_an_out_it_cannot_write_before_drawing(tmp_path, monkeypatch):
    """A bad --out is one error line before the schedule is computed (not an OSError or matplotlib's
    ValueError at savefig): a path under a file, an extension matplotlib cannot write, and a folder
    that refuses files (a read-only mount; simulated, since root writes through chmod)."""
    import errno

    import util.cli
    flags = ['--t_0', '0.8', '--epochs', '10', '--warmup_epochs', '1', '--points', '20', '--out']
    (tmp_path / 'afile').write_text('')

    def not_before_the_checks(*args, **kwargs):
        raise AssertionError('the schedule was computed before --out was checked')

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, 'Read-only file system')
    with monkeypatch.context() as m:
        m.setattr(plot_lr_schedule.fo.FreezeOutSchedule, 'build', not_before_the_checks)
        with pytest.raises(SystemExit, match=f'^error: cannot create the folder of --out {tmp_path}/afile/x.png: '
                                             f'{tmp_path}/afile is a file, not a folder$'):
            plot_lr_schedule.main([*flags, str(tmp_path / 'afile' / 'x.png')])
        with pytest.raises(SystemExit, match=r'^error: --out .*/x\.txt: matplotlib cannot write \.txt files; use one '
                                             r'of the extensions .*\bpdf\b.*\bpng\b.*\bsvg\b'):
            plot_lr_schedule.main([*flags, str(tmp_path / 'x.txt')])
        m.setattr(util.cli.tempfile, 'TemporaryFile', read_only)
        with pytest.raises(SystemExit, match=f'^error: cannot write into the folder of --out {tmp_path}/ro/x.png: '
                                             'Read-only file system$'):
            plot_lr_schedule.main([*flags, str(tmp_path / 'ro' / 'x.png')])
    assert plot_lr_schedule.main([*flags, str(tmp_path / 'lr.PDF')]).stat().st_size > 1000  # any format it writes
