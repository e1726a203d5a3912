"""The warm interpreter that runs the end-to-end tests' `python script.py` (tests/script_server.py,
client in helpers.py): a script run there must see and do what it would in a fresh interpreter."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import helpers
import script_server
from helpers import run_cmd, subprocess_env

PROBE = '''
import atexit, json, os, sys, threading, time
print(json.dumps({
    'torch_already_imported': 'torch' in sys.modules,
    'name': __name__, 'file': __file__, 'package': __package__, 'spec': repr(__spec__), 'cached': __cached__,
    'loader': type(__loader__).__name__, 'main_is_this': sys.modules['__main__'].__dict__ is globals(),
    'argv': sys.argv, 'orig_argv': sys.orig_argv, 'cwd': os.getcwd(), 'path0': sys.path[0],
    'probe_var': os.environ.get('PROBE_VAR'), 'stdin': sys.stdin.read(),
    'own_session': os.getsid(0) == os.getpid()}), flush=True)
print('to stderr', file=sys.stderr)
atexit.register(lambda: print('atexit ran', flush=True))
threading.Thread(target=lambda: (time.sleep(0.3), print('thread joined', flush=True))).start()
how = sys.argv[1]
if how == 'raise':
    raise ValueError('boom')
if how == 'ctrl-c':
    raise KeyboardInterrupt
if how == 'term':
    os.kill(os.getpid(), 15)
    time.sleep(5)
if how == 'kill':
    os.kill(os.getpid(), 9)
sys.exit(int(how))
'''


@pytest.fixture
def probe(tmp_path):
    folder = tmp_path / 'scripts'
    folder.mkdir()
    (folder / 'probe.py').write_text(PROBE)
    return folder / 'probe.py'


def run_probe(probe, how: str, fresh: bool, monkeypatch, env: dict | None = None) -> helpers.Result:
    if fresh:
        monkeypatch.setenv('TESTS_FRESH_INTERPRETERS', '1')
    else:
        monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
    # a relative script path from another folder, as the tests run ViT/ scripts from ViT/
    return run_cmd([sys.executable, os.path.join('scripts', 'probe.py'), how], cwd=probe.parent.parent,
                   env=env, timeout=60)


def test_a_script_sees_and_does_what_it_would_in_a_fresh_interpreter(probe, monkeypatch):
    env = subprocess_env(PROBE_VAR='set for this run')
    for how, code in (('0', 0), ('3', 3), ('raise', 1), ('ctrl-c', -signal.SIGINT), ('term', -signal.SIGTERM)):
        warm = run_probe(probe, how, False, monkeypatch, env)
        fresh = run_probe(probe, how, True, monkeypatch, env)
        first_warm, first_fresh = (json.loads(r.stdout.splitlines()[0]) for r in (warm, fresh))
        # the warm run did go through the server, which has torch imported already
        assert first_warm.pop('torch_already_imported') and not first_fresh.pop('torch_already_imported')
        assert first_warm == first_fresh, how
        assert first_warm['name'] == '__main__' and first_warm['argv'] == ['scripts/probe.py', how]
        assert first_warm['main_is_this'] and first_warm['file'] == str(probe)
        assert first_warm['cwd'] == str(probe.parent.parent) and first_warm['path0'] == str(probe.parent)
        assert first_warm['probe_var'] == 'set for this run' and first_warm['stdin'] == ''
        assert first_warm['own_session']
        assert warm.returncode == fresh.returncode == code, (how, warm.describe(), fresh.describe())
        # exit as a fresh interpreter ends: non-daemon threads joined, then atexit hooks
        assert warm.stdout.splitlines()[1:] == fresh.stdout.splitlines()[1:], how
        if how != 'term':
            assert warm.stdout.splitlines()[1:] == ['thread joined', 'atexit ran'], how
        assert warm.stderr.startswith('to stderr\n') and fresh.stderr.startswith('to stderr\n')
        if how == 'raise':
            assert 'ValueError: boom' in warm.stderr and 'Traceback' in warm.stderr


def test_a_changed_startup_variable_gets_a_fresh_interpreter(probe, monkeypatch):
    monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
    res = run_probe(probe, '0', False, monkeypatch, subprocess_env(OMP_NUM_THREADS='2'))
    assert res.returncode == 0, res.describe()
    assert not json.loads(res.stdout.splitlines()[0])['torch_already_imported']
    assert not helpers.warm_interpreter_fits([sys.executable, '-c', 'pass'], subprocess_env())


@pytest.mark.parametrize('fresh', [False, True])
def test_a_hang_is_killed_with_its_process_group_and_fails_the_test(fresh, tmp_path, monkeypatch):
    if fresh:
        monkeypatch.setenv('TESTS_FRESH_INTERPRETERS', '1')
    else:
        monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
    pid_file = tmp_path / 'pids'
    script = tmp_path / 'hang.py'
    # the script and a child of it in its process group both write their pids, then sleep
    script.write_text('import os, subprocess, sys, time\n'
                      'child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n'
                      f'open({str(pid_file)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")\n'
                      'time.sleep(60)\n')
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match='timed out after 3s'):
        run_cmd([sys.executable, script], timeout=3, cwd=tmp_path)
    assert time.monotonic() - start < 30
    for pid in map(int, pid_file.read_text().split()):
        for _ in range(100):  # the server reaps its child within 50 ms; the grandchild goes to init
            if not running(pid):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f'process {pid} still runs')


def running(pid: int) -> bool:
    """Neither gone nor a zombie (an orphan's zombie stays until init reaps it)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_a_process_in_another_session_holding_the_output_open_is_a_timeout_too(tmp_path, monkeypatch):
    """As communicate(timeout) counts the pipes' end: a run that exits at once but leaves a process
    of another session (out of reach of the group's kill) writing to its stdout for 8 s."""
    script = tmp_path / 'leaves_a_writer.py'
    script.write_text('import subprocess, sys\n'
                      'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(8)"],\n'
                      '                 start_new_session=True)\n')
    for fresh in (False, True):
        if fresh:
            monkeypatch.setenv('TESTS_FRESH_INTERPRETERS', '1')
        else:
            monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
        with pytest.raises(pytest.fail.Exception, match='timed out after 3s'):
            run_cmd([sys.executable, script], timeout=3, cwd=tmp_path)


def test_consecutive_warm_runs_start_from_different_random_states(tmp_path, monkeypatch):
    """Each run draws its own random states and, in turn from two servers, its own str hash seed:
    two runs of a test that should differ (an unseeded draw) do, as in fresh interpreters. A
    changed TMPDIR is read again."""
    monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
    script = tmp_path / 'draws.py'
    script.write_text('import json, random, sys, tempfile\n'
                      'warm = "torch" in sys.modules\n'
                      'import numpy, torch\n'
                      'print(json.dumps([warm, random.random(), float(numpy.random.rand()), torch.rand(1).item(),'
                      ' hash("x"), tempfile.gettempdir()]))\n')
    (tmp_path / 'tmp').mkdir()
    runs = [json.loads(run_cmd([sys.executable, script], cwd=tmp_path,
                               env=subprocess_env(TMPDIR=str(tmp_path / 'tmp'))).stdout) for _ in range(2)]
    assert runs[0][0] and runs[1][0]  # both warm
    assert all(a != b for a, b in zip(runs[0][1:5], runs[1][1:5])), runs
    assert runs[0][5] == runs[1][5] == str(tmp_path / 'tmp')


# ---- the tool scripts' own runs: VIT_PYTHON = `python script_server.py --run` --------------------

def nested(env: dict[str, str]) -> list[str]:
    """The command a tool script would start its runs with, under helpers.warm_nested_runs(env)."""
    nested_env = helpers.warm_nested_runs(env)
    assert nested_env['VIT_PYTHON'].split()[1:] == [str(helpers.ROOT / 'tests' / 'script_server.py'), '--run']
    env.clear()
    env.update(nested_env)
    return nested_env['VIT_PYTHON'].split()


def test_a_nested_run_through_the_client_does_what_a_fresh_one_does(probe, monkeypatch):
    monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
    env = subprocess_env(PROBE_VAR='nested')
    client = nested(env)
    for how, code in (('0', 0), ('3', 3), ('raise', 1), ('ctrl-c', -signal.SIGINT), ('term', -signal.SIGTERM),
                      ('kill', -signal.SIGKILL)):
        runs = [subprocess.run([*command, os.path.join('scripts', 'probe.py'), how], cwd=probe.parent.parent,
                               env=env, capture_output=True, text=True, timeout=60)
                for command in (client, [sys.executable])]
        firsts = [json.loads(r.stdout.splitlines()[0]) for r in runs]
        assert firsts[0].pop('torch_already_imported') and not firsts[1].pop('torch_already_imported')
        assert firsts[0].pop('own_session') and not firsts[1].pop('own_session')  # the server's child: setsid
        assert firsts[0] == firsts[1], how
        assert runs[0].returncode == runs[1].returncode == code, (how, runs)
        assert [r.stdout.splitlines()[1:] for r in runs] == [runs[1].stdout.splitlines()[1:]] * 2
        assert all(r.stderr.startswith('to stderr\n') for r in runs), how


def test_the_client_forwards_ctrl_c_and_a_killed_client_takes_its_run_along(tmp_path, monkeypatch):
    monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
    env = subprocess_env()
    client = nested(env)
    script = tmp_path / 'waits.py'
    # the run and a child in its process group (as DataLoader workers are) both get the signal
    script.write_text('import os, subprocess, sys, time\n'
                      'child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n'
                      'try:\n'
                      '    print(os.getpid(), child.pid, "torch" in sys.modules, flush=True)\n'
                      '    time.sleep(60)\n'
                      'except KeyboardInterrupt:\n'
                      '    print("interrupted", flush=True)\n'
                      '    sys.exit(130)\n')
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen([*client, script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
        *pids, warm = proc.stdout.readline().split()
        assert warm == 'True'
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        if sig == signal.SIGINT:  # the run's own handling, and its exit code as the client's
            assert out == 'interrupted\n' and proc.returncode == 130
        # SIGKILL: the server saw the connection close and killed the run's group
        assert all_gone(map(int, pids)), (sig, pids)


def all_gone(pids, within: float = 10) -> bool:
    until = time.monotonic() + within
    pids = list(pids)
    while any(running(pid) for pid in pids):
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


def test_a_client_gone_right_after_its_run_started_takes_the_run_along(tmp_path, monkeypatch):
    """The server sends the pid once the run leads its own group: a client that goes away at any
    moment after that (killed by study.py or `timeout -k`) reaches the run."""
    monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
    env = subprocess_env()
    nested(env)
    script = tmp_path / 'late.py'
    script.write_text('import sys, time\ntime.sleep(1.5)\nopen(sys.argv[1], "w").close()\n')
    path = env[script_server.SERVERS_VAR].split(os.pathsep)[0]
    with open(os.devnull, 'w') as devnull:
        for i in range(10):  # as a client killed at once: the request, the pid, gone
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(path)
                request = {'argv': [str(script), str(tmp_path / f'ran{i}')], 'cwd': str(tmp_path), 'env': env}
                socket.send_fds(conn, [json.dumps(request).encode() + b'\n'], [devnull.fileno()] * 2)
                assert script_server.LineReader(conn).line(30).isdigit()
    time.sleep(3)
    assert not list(tmp_path.glob('ran*'))


def test_a_server_whose_test_process_ended_stops_its_runs(tmp_path):
    """A test process killed outright (its servers' stdin closes) leaves no run behind."""
    server = script_server.WarmInterpreter(subprocess_env())
    server.SERVERS = 1
    env = {**subprocess_env(), **server.nested_env()}
    script = tmp_path / 'sleeps.py'
    script.write_text('import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n')
    client = subprocess.Popen([*env['VIT_PYTHON'].split(), script], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = int(client.stdout.readline())
    process, _ = server.servers[0]
    process.stdin.close()
    assert process.wait(timeout=30) == 0
    assert all_gone([pid])
    out, err = client.communicate(timeout=30)
    assert client.returncode == 1 and 'lost the server during' in err


def test_the_client_runs_a_fresh_interpreter_where_the_warm_one_does_not_fit(probe, monkeypatch):
    """A changed start-up variable (the server says "fresh"), or no server to ask."""
    monkeypatch.delenv('TESTS_FRESH_INTERPRETERS', raising=False)
    env = subprocess_env()
    client = nested(env)
    for changed in ({'OMP_NUM_THREADS': '2'}, {'TESTS_SCRIPT_SERVERS': ''}):
        res = subprocess.run([*client, probe, '3'], cwd=probe.parent, env={**env, **changed},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 3, (changed, res)
        assert not json.loads(res.stdout.splitlines()[0])['torch_already_imported'], changed
