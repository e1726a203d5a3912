"""Imported first by every entry script, before torch: Ctrl-C while the imports load (a few
seconds) ends the process with one line instead of a KeyboardInterrupt traceback through
importlib. Only when the process was started as one of the scripts in ViT/ (a test or a notebook
importing them keeps its own handler). `util.runtime.run_main` and `run_tool` below put Python's
own handler back once the imports are done and end a later Ctrl-C with one line too."""
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable


def _interrupted(signum: int, frame: object) -> None:
    print('interrupted', file=sys.stderr, flush=True)
    os._exit(130)  # nothing done yet; no unwinding through half-imported modules and their atexit hooks


def _started_as_entry_script() -> bool:
    main_file = getattr(sys.modules.get('__main__'), '__file__', None)
    return bool(main_file) and Path(main_file).resolve().parent == Path(__file__).resolve().parent.parent


# not over an inherited SIG_IGN (a `cmd &` job in a non-interactive shell ignores Ctrl-C)
if _started_as_entry_script() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)


def imports_done() -> None:
    """Python's own Ctrl-C handler back (KeyboardInterrupt), where this module had replaced it."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_tool(main: Callable[[], Any]) -> None:
    """`__main__` of the tool scripts (demo, study, benchmark, estimate_speedup, plot_lr_schedule):
    a later Ctrl-C also ends with one line, not a traceback (a script may say more itself)."""
    imports_done()
    try:
        main()
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr, flush=True)
        raise SystemExit(130) from None
