"""Shared test setup: the ViT/ code is imported as top-level modules (`import models_mim`)."""
import signal
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread in the test processes, as in the scripts the tests start (helpers.py sets
# OMP_NUM_THREADS=1 for those): with pytest-xdist's two workers on two cores, a worker's default
# two threads, spinning while the other worker's subprocesses hold the cores, slowed in-process
# tests up to 30x (2 s alone, 65 s in the full run).
torch.set_num_threads(1)

# A suite started in the background of a script (`pytest ... &`, job control off) inherits Ctrl-C
# ignored, and so would every run it starts: the Ctrl-C tests need the default, as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / 'ViT') not in sys.path:
    sys.path.insert(0, str(ROOT / 'ViT'))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory) -> Path:
    """Small real-photo ImageFolder with train/ and val/: 4 classes x 8 images of 64 px."""
    from util.demo_data import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.getbasetemp() / 'eval_demo_data', num_classes=4,
                             images_per_class=8, size=64)


def pytest_collection_modifyitems(items: list) -> None:
    """The long end-to-end runs (@pytest.mark.long, 30-180 s each here) first: with -n 2 they then
    share the two workers with the short tests instead of ending the session on one worker."""
    items.sort(key=lambda item: item.get_closest_marker('long') is None)  # stable: file order otherwise


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's, absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """-n without --dist: work stealing, so that a worker left with a queue of tests (the long
    ones above) hands some to an idle one."""
    if config.getvalue('dist') == 'load' and not any(a.startswith('--dist') for a in config.invocation_params.args):
        from xdist.scheduler import WorkStealingScheduling
        return WorkStealingScheduling(config, log)
    return None
