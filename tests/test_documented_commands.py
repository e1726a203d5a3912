"""Every command the README (and the researcher's notes, where ../shared has them) shows for a
script in ViT/ is accepted by that script as written: its flags parse and pass the script's own
checks. A renamed flag, a changed choice or a new check that the documented recipes fail
shows up here instead of in a user's terminal."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPTS = ('run_pretrain', 'run_finetune', 'run_linprobe', 'run_knn', 'benchmark', 'study', 'estimate_speedup',
           'plot_lr_schedule')
NOTES = ROOT.parent / 'shared' / 'docs' / 'research-notes.md'


def documented_commands(markdown: str) -> list[tuple[str, list[str]]]:
    """(script, flags) for each command in the ```bash code blocks that starts one of SCRIPTS:
    comments dropped, continuation lines joined, `<placeholder>` made one word, flags ending at
    the first `&&`, `;` or `|`."""
    commands = []
    for block in re.findall(r'^```(?:bash|sh|shell)\n(.*?)^```', markdown, flags=re.S | re.M):
        lines = [re.sub(r'\s#.*$', '', line) for line in block.splitlines() if not line.lstrip().startswith('#')]
        for command in '\n'.join(lines).replace('\\\n', ' ').splitlines():
            if not re.search(rf'\b({"|".join(SCRIPTS)})\.py\b', command):
                continue
            words = shlex.split(re.sub(r'<[^>]*>', 'PLACEHOLDER', command))
            for i, word in enumerate(words):
                name = Path(word).name.removesuffix('.py')
                if word.endswith('.py') and name in SCRIPTS:
                    flags = words[i + 1:]
                    ends = [j for j, w in enumerate(flags) if w in ('&&', ';', '|', '||')]
                    commands.append((name, flags[:ends[0]] if ends else flags))
                    break
    return commands


def accept(script: str, flags: list[str], tmp_path: Path) -> None:
    """What the script does with `flags` before touching data, a checkpoint or a GPU."""
    module = importlib.import_module(script)
    if script in ('estimate_speedup', 'plot_lr_schedule'):  # cheap: run them whole
        if script == 'plot_lr_schedule':
            flags = [*flags, '--out', str(tmp_path / 'plot.png')]  # argparse keeps the last --out
        module.main(flags)
        return
    args = module.get_args_parser().parse_args(flags)
    if hasattr(module, 'check_args'):
        for flag in ('finetune', 'resume'):  # the checks want a file there; the paths shown are the user's
            if getattr(args, flag, ''):
                setattr(args, flag, tmp_path / f'{flag}.pth')
                getattr(args, flag).write_bytes(b'not read by the checks')
        module.check_args(args)


def _readme_commands() -> list[tuple[str, list[str]]]:
    return documented_commands((ROOT / 'README.md').read_text())


def test_the_readme_shows_every_script_and_each_command_is_found():
    found = {script for script, _ in _readme_commands()}
    assert found == set(SCRIPTS), set(SCRIPTS) - found
    # the extraction itself: comments, continuations, placeholders, a chained command
    sample = ('```\nrun_knn.py\'s layout\n```\n'
              '```bash\n# a comment\ncd ViT && python3 run_knn.py --model vit_base_patch16 \\\n'
              '  --data_path <a folder> --nb_knn 10 20   # two ks\npython3 other.py --x 1\n'
              'python3 study.py --quick && echo done\n```\n')
    assert documented_commands(sample) == [
        ('run_knn', ['--model', 'vit_base_patch16', '--data_path', 'PLACEHOLDER', '--nb_knn', '10', '20']),
        ('study', ['--quick'])]


@pytest.mark.parametrize('script, flags', _readme_commands(),
                         ids=lambda v: v if isinstance(v, str) else ' '.join(v)[:60])
def test_a_readme_command_is_accepted(script, flags, tmp_path):
    accept(script, flags, tmp_path)


def test_the_research_notes_commands_are_accepted(tmp_path):
    if not NOTES.is_file():
        pytest.skip(f'{NOTES} is absent (the researcher\'s notes live beside the checkout, in ../shared)')
    commands = documented_commands(NOTES.read_text())
    # the notes' launch commands: torch.distributed.launch adds --local-rank=N to each process's flags
    assert {s for s, _ in commands} == {'run_pretrain', 'run_finetune'} and len(commands) >= 10, commands
    for script, flags in commands:
        accept(script, [*flags, '--local-rank=0'], tmp_path)
