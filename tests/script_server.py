"""A warm interpreter for the end-to-end tests: `python tests/script_server.py SOCKET` imports
torch, torchvision and timm once, then forks one child per script run. Each run then skips the
6-7 s of CPU that a fresh `python script.py` spends on those imports on the 2-core VM (most of
the suite's time), and otherwise runs as that command would: its own session, cwd, environment,
stdin from /dev/null, stdout and stderr on the caller's pipes, `sys.argv`, `sys.path[0]` and
`__main__` as for a script, the usual interpreter exit (atexit hooks, threads joined, exit
status). Project modules are never imported here, so each run imports the code under test afresh.

Protocol, one Unix-socket connection per run: the client sends one JSON line
{"argv": [script, *args], "cwd": ..., "env": {...}} with its stdout and stderr pipe ends attached
(SCM_RIGHTS); the server answers "<pid>\\n" once the child is forked and "<exit code>\\n" (negative:
killed by that signal, as subprocess reports it) when the child has ended. The server stops when
its stdin closes (the test process has gone). Its first stdout line is "ready" or, when the
imports printed a warning that a fresh interpreter would print to each run, "unfit: <why>"; the
client then starts fresh interpreters instead. Both sides live here: the server (this file run as
a script) and the client, WarmInterpreter, which tests/helpers.py's run_cmd uses.
"""
from __future__ import annotations

import atexit
import builtins
import contextlib
import gc
import importlib
import importlib.machinery
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from contextlib import redirect_stderr
from typing import Callable


# what the entry scripts import first (tensorboard: where installed)
HEAVY_MODULES = ('numpy', 'PIL.Image', 'torch', 'torch.distributed', 'torchvision.datasets', 'torchvision.transforms',
                 'timm', 'torch.utils.tensorboard')


def import_heavy_modules() -> str:
    """Imports HEAVY_MODULES; returns what the imports printed or warned, if anything."""
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stderr(printed):
        warnings.simplefilter('always')
        for name in HEAVY_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:
                if name != 'torch.utils.tensorboard':
                    raise
    return '; '.join([str(w.message) for w in caught] + [printed.getvalue().strip()]).strip('; ')


def read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
    while not data.endswith(b'\n'):
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError('request cut short')
        data += more
    return json.loads(data), fds


def serve(path: str) -> tuple[dict, list[int]] | None:
    """Runs in the server; returns only in a forked child, with the request it is to run."""
    unfit = import_heavy_modules()
    # the imported modules' objects out of the collector's reach: a child's collections, above
    # all the last one as it exits, then neither walk them (1.9 s -> 0.5 s per exit here) nor
    # copy the pages they sit on
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print(f'unfit: {unfit}' if unfit else 'ready', flush=True)
    running: dict[int, socket.socket] = {}  # child pid -> its client's connection
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1024):
            return None  # the test process has gone
        if listener in readable:
            conn, _ = listener.accept()
            request, fds = read_request(conn)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                for sock in (listener, conn, *running.values()):
                    sock.close()
                return request, fds
            for fd in fds:
                os.close(fd)
            conn.sendall(f'{pid}\n'.encode())
            running[pid] = conn
        while running:  # reap; a single thread, so forking stays safe
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = running.pop(pid)
            try:
                conn.sendall(f'{os.waitstatus_to_exitcode(status)}\n'.encode())
            except OSError:
                pass  # the client gave up on it (a timeout)
            conn.close()


def become_script(request: dict, fds: list[int]) -> None:
    """In the forked child: set up the process as `python script args...` would be, then run it."""
    os.setsid()
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (stdin, *fds):
        os.close(fd)
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    sys.argv = list(request['argv'])
    path = os.path.abspath(sys.argv[0])
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    # a fresh `__main__` as `python script.py` makes it (runpy's would also make sys.argv[0]
    # absolute); this server's own is done with
    main = types.ModuleType('__main__')
    main.__dict__.update(__file__=path, __builtins__=builtins, __package__=None, __spec__=None, __cached__=None,
                         __loader__=importlib.machinery.SourceFileLoader('__main__', path), __annotations__={})
    sys.modules['__main__'] = main
    with io.open_code(path) as f:
        code = compile(f.read(), path, 'exec')
    exec(code, main.__dict__)


# ---- the client side (tests/helpers.py's run_cmd) -------------------------------------------------

def stop_group(pid: int, ended: Callable[[float], bool]) -> None:
    """Stops a hung run's process group: SIGTERM, then SIGKILL if `ended(grace)` still says no.
    SIGTERM first: torchrun then stops its workers, which run in sessions of their own (a SIGKILL
    to the group would orphan them, and they would hold the pipes open)."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        if ended(grace):
            return


class WarmInterpreter:
    """Starts the server on first use (one per test process) and runs scripts in it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env  # the server's, which its children start from
        self.server: subprocess.Popen | None = None
        self.unfit = ''
        self.folder = ''

    def available(self) -> bool:
        if self.server is None and not self.unfit:
            self.start()
        return self.server is not None and self.server.poll() is None

    def start(self) -> None:
        self.folder = tempfile.mkdtemp(prefix='script_server_')
        atexit.register(shutil.rmtree, self.folder, True)
        self.server = subprocess.Popen([sys.executable, __file__, os.path.join(self.folder, 'socket')],
                                       env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first_line = self.server.stdout.readline().strip()
        if first_line != 'ready':
            self.unfit = first_line or f'the server exited with {self.server.wait()}'
            self.server.kill()
            self.server = None
            print(f'tests: a fresh interpreter for every script run ({self.unfit})', file=sys.stderr)

    def run(self, argv: list[str], timeout: float, cwd: os.PathLike,
            env: dict[str, str]) -> tuple[int | None, str, str]:
        """As subprocess.run(..., text=True) gives them: exit code (None: timed out, and
        stopped), stdout, stderr."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        outputs: dict[int, bytes] = {}

        def drain(fd: int) -> None:
            with open(fd, 'rb') as pipe:
                outputs[fd] = pipe.read()

        readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(os.path.join(self.folder, 'socket'))
            request = json.dumps({'argv': argv, 'cwd': str(cwd), 'env': env}).encode() + b'\n'
            socket.send_fds(conn, [request], [out_w, err_w])
            os.close(out_w)
            os.close(err_w)
            for t in readers:
                t.start()
            replies = LineReader(conn)
            pid = int(replies.line(60))
            code = replies.line(timeout)
            if code is None:
                stop_group(pid, lambda grace: replies.line(grace) is not None)
            for t in readers:
                t.join()
        return None if code is None else int(code), text(outputs[out_r]), text(outputs[err_r])


class LineReader:
    """Lines from a socket, each within a timeout (None: it did not come in time)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.buffer = conn, b''

    def line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b'\n' not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.conn.settimeout(left)
            try:
                data = self.conn.recv(4096)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError('the script server closed the connection without an exit code')
            self.buffer += data
        line, self.buffer = self.buffer.split(b'\n', 1)
        return line.decode()


def text(raw: bytes) -> str:
    """As subprocess's text mode decodes it: universal newlines."""
    return raw.decode(errors='replace').replace('\r\n', '\n').replace('\r', '\n')

if __name__ == '__main__':
    job = serve(sys.argv[1])
    if job is not None:
        # at the top level, so that the child ends as the script's own interpreter would
        become_script(*job)
