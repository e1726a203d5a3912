"""Every script's --help: each flag says what it does, and its default appears once, never as
"(default: True)" after an off switch."""
import importlib

import pytest

SCRIPTS = ['run_pretrain', 'run_finetune', 'run_linprobe', 'run_knn', 'benchmark', 'study']


@pytest.mark.parametrize('name', SCRIPTS)
def test_every_flag_has_a_help_text_and_one_default(name):
    parser = importlib.import_module(name).get_args_parser()
    for action in parser._actions:
        if action.option_strings and action.help != '==SUPPRESS==':
            assert action.help and len(action.help) > 5, (name, action.option_strings)
    for block in parser.format_help().split('\n  -'):  # one flag's help each
        assert block.count('(default: ') <= 1, block
        if block.lstrip('-').startswith('no_'):
            assert '(default: True)' not in block, block


def test_help_formatter_appends_the_default_only_where_the_help_is_silent():
    import argparse

    from util.cli import HelpFormatter
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument('--epochs', default=400, type=int, help='epochs')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin memory')
    text = ' '.join(p.format_help().split())
    assert '--epochs EPOCHS epochs (default: 400)' in text
    assert '(default: cuda when available)' in text and '(default: None)' not in text
    assert 'do not pin memory' in text and '(default: True)' not in text
