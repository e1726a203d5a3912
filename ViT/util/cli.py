"""Command-line help shared by the scripts."""
from __future__ import annotations

import argparse


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
