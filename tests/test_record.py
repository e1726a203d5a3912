"""Tests for record.sh: env words, logging, provenance, exit status."""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "record.sh"

# Prints an env var to stdout, a line to stderr, and exits 3.
SCRIPT = ("import os,sys; print('foo=' + os.environ['FOO']); "
          "print('to-stderr', file=sys.stderr); sys.exit(3)")


def run_record(args, cwd, script=RECORD):
    return subprocess.run(["bash", str(script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_env_exit_status_logs_and_provenance(tmp_path):
    out = tmp_path / "out"
    res = run_record(["FOO=bar baz", "python3", "-c", SCRIPT,
                      "--output_dir", str(out), "arg with spaces"], cwd=tmp_path)
    assert res.returncode == 3
    # still shown on the terminal
    assert "foo=bar baz" in res.stdout
    assert "to-stderr" in res.stdout  # stderr is merged into the shown stream

    log = (out / "cli_logs.txt").read_text()
    assert "foo=bar baz" in log and "to-stderr" in log
    assert log.startswith("=== ")  # header line before the output
    assert log.index("=== ") < log.index("foo=bar baz")

    prov = (out / "provenance.txt").read_text()
    words = ["python3", "-c", SCRIPT, "--output_dir", str(out), "arg with spaces"]
    cmd_line = next(l for l in prov.splitlines() if l.startswith("command:"))
    # the recorded command parses back to exactly the same words
    assert shlex.split(cmd_line.split(":", 1)[1]) == words
    env_line = next(l for l in prov.splitlines() if l.startswith("env:"))
    assert shlex.split(env_line.split(":", 1)[1]) == ["FOO=bar baz"]
    assert f"cwd:       {tmp_path}" in prov
    for key in ("date:", "host:", "python:", "torch:", "gpus:", "commit:"):
        assert key in prov


def test_env_only_for_command(tmp_path):
    out = tmp_path / "o"
    res = run_record(["A_1=x", "_B=y z", "python3", "-c",
                      "import os; print(os.environ['A_1'], os.environ['_B'])",
                      f"--output_dir={out}"], cwd=tmp_path)
    assert res.returncode == 0
    assert "x y z" in res.stdout


def test_output_dir_equals_form_and_appends(tmp_path):
    out = tmp_path / "eq" / "nested"
    for msg in ("first", "second"):
        res = run_record(["python3", "-c", f"print('{msg}')",
                          f"--output_dir={out}"], cwd=tmp_path)
        assert res.returncode == 0
    log = (out / "cli_logs.txt").read_text()
    assert "first" in log and "second" in log
    assert (out / "provenance.txt").read_text().count("=== run ") == 2


def test_default_output_dir(tmp_path):
    res = run_record(["python3", "-c", "print('hello-default')"], cwd=tmp_path)
    assert res.returncode == 0
    assert "record_logs" in res.stderr
    logs = list((tmp_path / "record_logs").glob("*/cli_logs.txt"))
    assert len(logs) == 1 and "hello-default" in logs[0].read_text()


def test_outside_git_checkout(tmp_path):
    copy = tmp_path / "record.sh"
    shutil.copy(RECORD, copy)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(copy), "python3", "-c", "print(1)",
                          "--output_dir", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert "commit:    not a git checkout" in (out / "provenance.txt").read_text()
    assert not list(out.glob("provenance_*.diff"))


def test_inside_git_checkout_records_commit_and_diff(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(RECORD, repo / "record.sh")
    (repo / "f.txt").write_text("one\n")
    genv = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=genv, check=True,
                                    capture_output=True, text=True).stdout
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    head = git("rev-parse", "HEAD").strip()
    (repo / "f.txt").write_text("two\n")  # uncommitted change

    # cwd outside the repo: the commit must come from record.sh's location
    out = tmp_path / "out"
    res = run_record(["python3", "-c", "print(1)", "--output_dir", str(out)],
                     cwd=tmp_path, script=repo / "record.sh")
    assert res.returncode == 0
    prov = (out / "provenance.txt").read_text()
    assert f"commit:    {head}" in prov
    assert "M f.txt" in prov  # git status --short
    diffs = list(out.glob("provenance_*.diff"))
    assert len(diffs) == 1
    assert "+two" in diffs[0].read_text()


def test_usage_without_command(tmp_path):
    for args in ([], ["FOO=bar"], ["FOO=bar", "X=1"]):
        res = run_record(args, cwd=tmp_path)
        assert res.returncode == 2
        assert "usage:" in res.stderr
    assert not (tmp_path / "record_logs").exists()


def test_help():
    res = run_record(["--help"], cwd=ROOT)
    assert res.returncode == 0
    assert "usage:" in res.stdout


def test_exit_status_of_failing_command_not_found(tmp_path):
    res = run_record(["definitely-not-a-command-xyz", "--output_dir",
                      str(tmp_path / "o")], cwd=tmp_path)
    assert res.returncode == 127
    assert 'record.sh: definitely-not-a-command-xyz: no such command' in res.stdout + res.stderr


def test_vit_symlink_works(tmp_path):
    link = ROOT / "ViT" / "record.sh"
    assert link.is_symlink()
    assert os.readlink(link) == "../record.sh"
    out = tmp_path / "vit_out"
    res = subprocess.run(["bash", "record.sh", "FOO=vit", "python3", "-c", SCRIPT,
                          "--output_dir", str(out)], cwd=ROOT / "ViT",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3
    assert "foo=vit" in (out / "cli_logs.txt").read_text()
    prov = (out / "provenance.txt").read_text()
    assert f"cwd:       {ROOT / 'ViT'}" in prov
    if (ROOT / ".git").exists():
        assert f"git repo:  {ROOT}" in prov


def test_ctrl_c_is_recorded_when_the_command_exits_on_it(tmp_path):
    """Ctrl-C reaches the whole foreground group; the training scripts end on it with status 130
    (util.runtime.run_main), and record.sh still writes the status line."""
    import signal
    import sys
    import time
    command = ('import time\ntry:\n    print("started", flush=True); time.sleep(60)\n'
               'except KeyboardInterrupt:\n    raise SystemExit(130)')
    proc = subprocess.Popen(["bash", str(RECORD), sys.executable, "-c", command, "--output_dir", str(tmp_path / "o")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 30
    log = tmp_path / "o" / "cli_logs.txt"
    # the line the command prints, not the header that quotes the command (SIGINT during the
    # interpreter's start-up would end it with a traceback, exit 1)
    while not log.is_file() or "\nstarted\n" not in log.read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert log.read_text().endswith("record.sh: exit status 130\n")


def test_clean_checkout_writes_no_diff_and_leaves_the_runs_own_folder_out_of_git_status(tmp_path):
    repo = tmp_path / "repo"
    (repo / "ViT").mkdir(parents=True)
    shutil.copy(RECORD, repo / "record.sh")
    (repo / "ViT" / "run.py").write_text("pass\n")
    genv = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *args], cwd=repo, env=genv, check=True, capture_output=True)
    (repo / "ViT" / "new_module.py").write_text("x = 1\n")  # untracked code: still listed
    for _ in range(2):  # the second run finds the first one's folder
        res = run_record(["python3", "-c", "print(1)", "--output_dir", "full_pretrain_out_x"],
                         cwd=repo / "ViT", script=repo / "record.sh")
        assert res.returncode == 0, res.stderr
    out = repo / "ViT" / "full_pretrain_out_x"
    prov = (out / "provenance.txt").read_text()
    assert not list(out.glob("provenance_*.diff"))
    assert prov.count("diff:      none (tracked files as committed)") == 2
    status_lines = [line for line in prov.splitlines() if line.startswith("    ")]
    assert status_lines == ["    ?? ViT/new_module.py"] * 2, prov
