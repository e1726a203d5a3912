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
