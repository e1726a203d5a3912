"""Command-line help, start-up checks of output locations and the CPU count that sets defaults,
shared by the scripts (no torch import: the study's launcher reads them too)."""
from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
import tempfile
from pathlib import Path

# the cores this process may use (the CPU affinity that Slurm / cgroups / taskset set, as the
# DataLoader's own warning counts them), not the machine's
USABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


# the command the tool scripts (demo.py, study.py, measure_gpu.sh) start each training or
# evaluation script with, split on spaces: a wrapper such as `numactl --cpunodebind=0 python3`
PYTHON_VAR = 'VIT_PYTHON'


def python_command() -> list[str]:
    """$VIT_PYTHON split on spaces, its first word as the absolute path it names from here (the
    runs start in ViT/), or this interpreter when it is unset or blank; a first word that is no
    command is one `error:` line (the tools call this before their first run)."""
    words = os.environ.get(PYTHON_VAR, '').split()
    if not words:
        return [sys.executable]
    found = shutil.which(words[0])
    if found is None:
        raise SystemExit(f'error: {PYTHON_VAR}={os.environ[PYTHON_VAR]!r}: {words[0]} is not a command that can be '
                         f'started; unset {PYTHON_VAR} to run the scripts with {sys.executable}')
    return [os.path.abspath(found), *words[1:]]


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: HelpFormatter, and errors in one line with the closest flag for a
    mistyped one (argparse's usage block before it runs to dozens of lines here)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message}{self._suggestion(message)}; {self.prog} --help lists the flags\n')

    def _suggestion(self, message: str) -> str:
        if not message.startswith('unrecognized arguments: '):
            return ''
        names = [o[2:] for a in self._actions for o in a.option_strings if o.startswith('--')]
        guesses = [difflib.get_close_matches(word.split('=')[0][2:], names, n=1, cutoff=0.6)
                   for word in message.split(': ', 1)[1].split() if word.startswith('--')]
        guesses = list(dict.fromkeys('--' + g[0] for g in guesses if g))  # two typos of one flag: named once
        return f' (did you mean {" / ".join(guesses)}?)' if guesses else ''


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default, unless the help already speaks of it or the flag is
    an on/off switch (where "(default: True)" after --no_x would read as if the switch were on);
    the description keeps its own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ''
        if 'default' in text or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def help_only_for(parser: argparse.ArgumentParser, shown: set[str]) -> None:
    """Leaves out of --help (usage and list) every flag of `parser` whose dest is not in `shown`;
    they are still accepted. For the tools that take a whole run_pretrain.py command and read a few
    of its flags."""
    unknown = shown - {a.dest for a in parser._actions}
    assert not unknown, f'no such flags: {sorted(unknown)}'
    for action in parser._actions:
        if action.dest not in shown and action.dest != 'help':
            action.help = argparse.SUPPRESS


def check_output_folder(folder: str | Path, what: str) -> None:
    """Creates `folder` (and its parents) and makes sure it takes a new file, else one `error:` line
    about `what` (e.g. '--out bench'): the tools call it at start-up, so a location that cannot hold
    their results stops them before the work, not after it."""
    path = Path(folder)
    try:
        # mkdir's own errors for a file in the way read "File exists" / "Not a directory": name the file
        in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if in_the_way is not None:
            raise SystemExit(f'error: cannot create {what}: {in_the_way} is a file, not a folder')
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f'error: cannot create {what}: {e.strerror or e}') from None
    try:  # an existing folder may still refuse files (read-only mount, permissions, full quota)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SystemExit(f'error: cannot write into {what}: {e.strerror or e}') from None
