"""A warm interpreter for the end-to-end tests: `python tests/script_server.py SOCKET` imports
torch, torchvision and timm once, then forks one child per script run. Each run then skips the
6-7 s of CPU that a fresh `python script.py` spends on those imports on the 2-core VM (most of
the suite's time), and otherwise runs as that command would: its own session, cwd, environment,
stdin from /dev/null, stdout and stderr on the caller's pipes, `sys.argv`, `sys.orig_argv`,
`sys.path[0]` and `__main__` as for a script, fresh random states, the usual interpreter exit
(threads joined, atexit hooks, exit status). Project modules are never imported here, so each
run imports the code under test afresh. What still differs: those three packages (and what
they import) are in `sys.modules` before the script imports them; tracebacks start with two
frames of this file; the str hash seed is the server's, which is why the client keeps two
servers and takes them in turn.

Protocol, one Unix-socket connection per run: the client sends one JSON line
{"argv": [script, *args], "cwd": ..., "env": {...}} with its stdout and stderr pipe ends attached
(SCM_RIGHTS); the child answers "<pid>\\n" once it leads its own process group, the server
"<exit code>\\n" (negative: killed by that signal, as subprocess reports it) when the child has
ended. The server stops when its stdin closes (the test process has gone), and its runs with it.
Its first stdout line is "ready" or, when the imports printed a warning that a fresh interpreter
would print to each run, "unfit: <why>"; the client then starts fresh interpreters instead.
Both sides live here: the server (this file run as a script) and the client, WarmInterpreter,
which tests/helpers.py's run_cmd uses.

The tool scripts' own runs (study.py, demo.py and measure_gpu.sh start each script with the command
in $VIT_PYTHON) come here too when a test sets WarmInterpreter.nested_env(): VIT_PYTHON is then
`python script_server.py --run`, a thin client that stands in for the script's process. It passes
its stdout and stderr, cwd and environment to a server, forwards SIGINT / SIGTERM / SIGHUP to the
run, and ends as the run ended (exit code, or the same signal); a client killed outright closes its
connection, and the server kills the run's process group. A run whose environment differs from the
server's in a variable read at start-up gets a fresh interpreter instead (the server answers
"fresh").
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
import random
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


# Environment variables read when the interpreter or its libraries start: a run whose value of
# one differs from the warm interpreter's needs a fresh interpreter. Not the inductor's cache
# folder: inductor reads it when it compiles, and sets it in a process that compiled in-process.
STARTUP_VARS = ('PYTHON', 'OMP_', 'MKL_', 'KMP_', 'OPENBLAS', 'LD_', 'MALLOC', 'TORCH', 'PYTORCH_', 'CUDA', 'HF_',
                'LC_', 'LANG', 'HOME', 'XDG_')
READ_LATER = {'TORCHINDUCTOR_CACHE_DIR'}
SERVERS_VAR = 'TESTS_SCRIPT_SERVERS'  # the servers' socket paths, for the --run client


def startup_env_differs(a: dict[str, str], b: dict[str, str]) -> bool:
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    return any(k.startswith(STARTUP_VARS) for k in changed - READ_LATER)


# what every entry script imports, and nothing more (a submodule imported here and not in a
# script, e.g. torch.utils.tensorboard, would hide a missing import; each costs a fresh run too)
HEAVY_MODULES = ('torch', 'torchvision', 'timm')


def import_heavy_modules() -> str:
    """Imports HEAVY_MODULES; returns what the imports printed or warned, if anything."""
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stderr(printed):
        warnings.simplefilter('always')
        for name in HEAVY_MODULES:
            importlib.import_module(name)
    return '; '.join([str(w.message) for w in caught] + [printed.getvalue().strip()]).strip('; ')


def read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
    while not data.endswith(b'\n'):
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError('request cut short')
        data += more
    return json.loads(data), fds


def serve(path: str) -> tuple[dict, list[int], socket.socket] | None:
    """Runs in the server; returns only in a forked child, with the request it is to run."""
    own_env = dict(os.environ)
    unfit = import_heavy_modules()
    # the imported modules' objects out of the collector's reach: a child's collections, above
    # all the last one as it exits, then neither walk them (1.9 s -> 0.5 s per exit here) nor
    # copy the pages they sit on
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print(f'unfit: {unfit}' if unfit else 'ready', flush=True)
    running: dict[int, socket.socket | None] = {}  # child pid -> its client's connection (None: gone)
    while True:
        connections = [conn for conn in running.values() if conn is not None]
        readable, _, _ = select.select([listener, sys.stdin, *connections], [], [], 0.05)
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1024):
            stop_runs(list(running))  # the test process has gone (killed, perhaps): its runs go too
            return None
        for pid, conn in running.items():
            if conn in readable and client_gone(conn):  # before its run ended: as a killed process's child
                kill_run(pid, signal.SIGKILL)
                conn.close()
                running[pid] = None
        if listener in readable:
            conn, _ = listener.accept()
            try:
                request, fds = read_request(conn)
            except (OSError, ValueError):  # a client that went away mid-request: not this server's end
                conn.close()
                continue
            if request.get('fresh_if_env_differs') and startup_env_differs(own_env, request['env']):
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    conn.sendall(b'fresh\n')
                conn.close()
                continue
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                for sock in (listener, *filter(None, running.values())):
                    sock.close()
                return request, fds, conn
            for fd in fds:
                os.close(fd)
            running[pid] = conn  # the child sends its pid once it leads its own group (become_script)
        while running:  # reap; a single thread, so forking stays safe
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = running.pop(pid)
            if conn is None:
                continue
            try:
                conn.sendall(f'{os.waitstatus_to_exitcode(status)}\n'.encode())
            except OSError:
                pass  # the client gave up on it (a timeout)
            conn.close()


def kill_run(pid: int, sig: int) -> None:
    """Signals a run's process group, or the run alone if it has not called setsid yet (its pid
    cannot be reused before this server reaps it)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_runs(pids: list[int]) -> None:
    """SIGTERM to each run's group (torchrun then stops its workers), SIGKILL to what is left
    after 10 s."""
    for pid in pids:
        kill_run(pid, signal.SIGTERM)
    until = time.monotonic() + 10
    while pids and time.monotonic() < until:
        pids = [pid for pid in pids if os.waitpid(pid, os.WNOHANG)[0] == 0]
        time.sleep(0.05)
    for pid in pids:
        kill_run(pid, signal.SIGKILL)


def client_gone(conn: socket.socket) -> bool:
    """A readable connection of a running run: clients send nothing after the request, so this is
    its end."""
    try:
        return not conn.recv(1)
    except OSError:
        return True


def become_script(request: dict, fds: list[int], conn: socket.socket) -> None:
    """In the forked child: set up the process as `python script args...` would be, then run it."""
    os.setsid()
    # the pid only now: a client that signals the run's group, or goes away, from then on reaches it
    with contextlib.suppress(OSError):
        conn.sendall(f'{os.getpid()}\n'.encode())
    conn.close()
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
    sys.orig_argv = [sys.executable, *sys.argv]
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    # fresh random states, as a fresh interpreter draws them (a forked child has the server's)
    random.seed()
    sys.modules['numpy'].random.seed()
    sys.modules['torch'].seed()
    path = os.path.abspath(sys.argv[0])
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    # a fresh `__main__` as `python script.py` makes it (runpy's would also make sys.argv[0]
    # absolute); this server's own is done with
    main = types.ModuleType('__main__')
    main.__dict__.update(__file__=path, __builtins__=builtins, __package__=None, __spec__=None, __cached__=None,
                         __loader__=importlib.machinery.SourceFileLoader('__main__', path), __annotations__={})
    sys.modules['__main__'] = sys.modules['__mp_main__'] = main  # multiprocessing aliases it on import
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
    """Starts the servers on first use (per test process) and runs scripts in them, in turn. Two
    servers: the str hash seed is fixed when an interpreter starts, so that a test's consecutive
    runs (a run, then its resume) see different seeds, as fresh interpreters would."""
    SERVERS = 2

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env  # the servers', which their children start from
        self.servers: list[tuple[subprocess.Popen, str]] = []  # (process, socket path)
        self.unfit = ''
        self.turn = 0
        self.lock = threading.Lock()

    def available(self) -> bool:
        with self.lock:
            if not self.servers and not self.unfit:
                self.start()
            return bool(self.servers) and all(process.poll() is None for process, _ in self.servers)

    def start(self) -> None:
        folder = tempfile.mkdtemp(prefix='script_server_')
        atexit.register(shutil.rmtree, folder, True)
        sockets = [os.path.join(folder, f'socket{i}') for i in range(self.SERVERS)]
        started = [(subprocess.Popen([sys.executable, __file__, path], env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True), path) for path in sockets]
        for process, _ in started:
            first_line = process.stdout.readline().strip()
            if first_line != 'ready' and not self.unfit:
                self.unfit = first_line or f'a script server exited with {process.wait()}'
        if self.unfit:
            for process, _ in started:
                process.kill()
            print(f'tests: a fresh interpreter for every script run ({self.unfit})', file=sys.stderr)
        else:
            self.servers = started

    def nested_env(self) -> dict[str, str]:
        """Variables that send the tool scripts' own runs (VIT_PYTHON) to these servers; none when
        they are off or the paths would not survive VIT_PYTHON's split on spaces."""
        if not self.available():
            return {}
        command = [sys.executable, os.path.abspath(__file__), '--run']
        if any(len(word.split()) != 1 for word in command):
            return {}
        return {'VIT_PYTHON': ' '.join(command), SERVERS_VAR: os.pathsep.join(path for _, path in self.servers)}

    def run(self, argv: list[str], timeout: float, cwd: os.PathLike,
            env: dict[str, str]) -> tuple[int | None, str, str]:
        """As subprocess's communicate(timeout) with text=True gives them: exit code (None: not
        ended, pipes included, within the timeout; the run's group is then stopped), stdout, stderr."""
        with self.lock:
            path = self.servers[self.turn % len(self.servers)][1]
            self.turn += 1
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        outputs: dict[int, list[bytes]] = {out_r: [], err_r: []}

        def drain(fd: int) -> None:
            with open(fd, 'rb') as pipe:
                while chunk := pipe.read1(1 << 16):
                    outputs[fd].append(chunk)

        readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in outputs]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            request = json.dumps({'argv': argv, 'cwd': str(cwd), 'env': env}).encode() + b'\n'
            socket.send_fds(conn, [request], [out_w, err_w])
            os.close(out_w)
            os.close(err_w)
            for t in readers:
                t.start()
            replies = LineReader(conn)
            pid = replies.line(60)
            if pid is None:
                raise ConnectionError(f'the script server {path} did not start the run within 60 s')
            pid = int(pid)
            code: list[str | None] = [None]

            def ended(within: float) -> bool:
                """The exit code and the pipes' end (a process in another session may hold
                them), within `within` seconds."""
                until = time.monotonic() + within
                if code[0] is None:
                    code[0] = replies.line(within)
                for t in readers:
                    t.join(max(0.0, until - time.monotonic()))
                return code[0] is not None and not any(t.is_alive() for t in readers)

            try:
                in_time = ended(timeout)
                if not in_time:
                    stop_group(pid, ended)
            except ConnectionError:  # the server died: its child may still run
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                raise
        out, err = (text(b''.join(outputs[fd])) for fd in (out_r, err_r))
        return (int(code[0]) if in_time else None), out, err


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


# ---- the nested-run client (`python script_server.py --run script.py args...`) ------------------

def run_as_client(argv: list[str]) -> None:
    """Runs `python script.py args` (argv) in a server child and ends as that run ended; where no
    server can take it, execs a fresh interpreter on it."""
    paths = [p for p in os.environ.get(SERVERS_VAR, '').split(os.pathsep) if p]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not paths or not argv or argv[0].startswith('-'):  # no server, or `-c code`, `-m module`, stdin
            raise ConnectionRefusedError
        conn.connect(paths[os.getpid() % len(paths)])  # either server (their str hash seeds differ)
        request = {'argv': argv, 'cwd': os.getcwd(), 'env': dict(os.environ), 'fresh_if_env_differs': True}
        socket.send_fds(conn, [json.dumps(request).encode() + b'\n'], [1, 2])
    except OSError:  # not for a server, or the servers are gone (their test process ended)
        first = 'fresh'
    else:
        replies = LineReader(conn)
        try:
            first = replies.line(60)
        except OSError:
            first = 'fresh'  # the server went away before it forked the run
        if first is None:  # the request is the server's now: a fresh run could only double it
            raise SystemExit(f'script_server.py --run: no server started {argv[0]} within 60 s')
    if first == 'fresh':
        conn.close()
        os.execv(sys.executable, [sys.executable, *argv])
    pid = int(first)

    def forward(signum: int, frame) -> None:  # as a terminal's Ctrl-C reaches the run's whole group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    code = None
    try:
        while code is None:
            code = replies.line(3600)
    except OSError as e:  # the server has gone; the run, orphaned, may still be running
        raise SystemExit(f'script_server.py --run: lost the server during {argv[0]} ({e})') from None
    code = int(code)
    if code < 0:  # killed by a signal: this process ends the same way
        with contextlib.suppress(OSError):  # SIGKILL's disposition cannot be set (nor needs to be)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == '__main__':
    if sys.argv[1] == '--run':
        run_as_client(sys.argv[2:])
    job = serve(sys.argv[1])
    if job is not None:
        # at the top level, so that the child ends as the script's own interpreter would
        become_script(*job)
