#!/usr/bin/env bash
# record.sh: run a command, keep a copy of everything it prints, and write down
# what produced it (command, environment words, git state, software, GPUs).
#
#   bash record.sh [NAME=value ...] command [args ...]
#
# Output goes to the command's --output_dir (or ./record_logs/<timestamp>):
#   cli_logs.txt                    everything the command printed (appended)
#   provenance.txt                  one block per run (appended)
#   provenance_<timestamp>.diff     uncommitted changes at launch (git diff HEAD), if any
#
# The exit status is the command's.
# No `set -e`: failing probes (git, torch, nvidia-smi) must not stop the run,
# and the command's own status is collected by hand below.
set -u

usage() {
    cat <<'EOF'
usage: bash record.sh [NAME=value ...] command [args ...]

Runs the command with the NAME=value words in its environment, shows its
output and appends it (stdout and stderr) to <output_dir>/cli_logs.txt, and
appends the run's provenance to <output_dir>/provenance.txt.
<output_dir> is taken from --output_dir X / --output_dir=X among the
arguments, else ./record_logs/<timestamp>. Exits with the command's status.

example:
  bash record.sh CUDA_VISIBLE_DEVICES=0,1 OMP_NUM_THREADS=1 \
    python3 run_pretrain.py --epochs 100 --output_dir out
EOF
}

if [[ $# -ge 1 && ( "$1" == "--help" || "$1" == "-h" ) ]]; then
    usage
    exit 0
fi

# --- split leading NAME=value words from the command --------------------------
env_words=()
while [[ $# -gt 0 && "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
    env_words+=("$1")
    shift
done
if [[ $# -eq 0 ]]; then
    echo "record.sh: no command given" >&2
    usage >&2
    exit 2
fi
cmd=("$@")

stamp=$(date +%Y%m%d_%H%M%S)
now=$(date -Iseconds)

# --- where to write: the command's own --output_dir -----------------------------
out_dir=""
for ((i = 1; i < ${#cmd[@]}; i++)); do
    case "${cmd[i]}" in
        --output_dir=*) out_dir="${cmd[i]#--output_dir=}" ;;
        --output_dir) ((i + 1 < ${#cmd[@]})) && out_dir="${cmd[i + 1]}" ;;
    esac
done
if [[ -z "$out_dir" ]]; then
    out_dir="./record_logs/$stamp"
    echo "record.sh: no --output_dir in the command; logging to $out_dir" >&2
fi
if ! mkdir -p -- "$out_dir"; then
    echo "record.sh: cannot create $out_dir" >&2
    exit 2
fi
log="$out_dir/cli_logs.txt"
prov="$out_dir/provenance.txt"
diff_file="$out_dir/provenance_$stamp.diff"

# printf %q keeps the quoting, so the line can be pasted back into a shell.
quoted_cmd=$(printf '%q ' "${cmd[@]}")
quoted_env=""
((${#env_words[@]})) && quoted_env=$(printf '%q ' "${env_words[@]}")

# --- git state: the checkout holding record.sh (symlinks resolved), else cwd ---
script_dir=$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")
git_dir=""
for d in "$script_dir" "$PWD"; do
    if top=$(git -C "$d" rev-parse --show-toplevel 2>/dev/null); then
        git_dir=$top
        break
    fi
done

# Probes that may fail print 'unavailable' instead of stopping the run.
py_version=$(python3 -c 'import platform; print(platform.python_version())' 2>/dev/null) \
    || py_version=unavailable
torch_info=$(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null) \
    || torch_info=unavailable
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | paste -sd ';' -)
    [[ -n "$gpus" ]] || gpus=unavailable
else
    gpus=none
fi

# --- provenance block -------------------------------------------------------------
{
    echo "=== run $now ==="
    echo "date:      $now"
    echo "host:      $(hostname 2>/dev/null || uname -n)"
    echo "cwd:       $PWD"
    echo "env:       $quoted_env"
    echo "command:   $quoted_cmd"
    if [[ -z "$git_dir" ]]; then
        echo "commit:    not a git checkout"
    else
        echo "git repo:  $git_dir"
        if commit=$(git -C "$git_dir" rev-parse HEAD 2>/dev/null); then
            echo "commit:    $commit"
            git -C "$git_dir" diff HEAD >"$diff_file" 2>/dev/null
        else
            # A fresh repository has no HEAD yet; diff against the empty index.
            echo "commit:    none (no commits yet)"
            git -C "$git_dir" diff >"$diff_file" 2>/dev/null
        fi
        if [[ -s "$diff_file" ]]; then
            echo "diff:      $diff_file ($(wc -l <"$diff_file") lines)"
        else
            rm -f -- "$diff_file"
            echo "diff:      none (tracked files as committed)"
        fi
        echo "git status --short (the run's own output folder left out):"
        # an untracked out_dir (or an entry inside it) holds this run's, or an earlier one's, outputs
        rel_out=$(realpath -m --relative-to="$git_dir" -- "$out_dir" 2>/dev/null)/
        git -C "$git_dir" status --short 2>/dev/null | while IFS= read -r line; do
            path=${line:3}
            if [[ "$line" == '?? '* && "$path" == "$rel_out"* ]]; then
                continue
            fi
            echo "    $line"
        done
    fi
    echo "python:    $py_version"
    echo "torch:     $torch_info"
    echo "gpus:      $gpus"
    echo
} >>"$prov"

# --- run it --------------------------------------------------------------------
echo "=== $now: $quoted_env$quoted_cmd" >>"$log"
# Env words are exported in a subshell so they reach only the command; the
# command's stderr joins stdout so both land in the log in the order printed.
# tee -i ignores Ctrl-C so it still records the command's last words.
(
    for w in ${env_words[@]+"${env_words[@]}"}; do
        export "$w"
    done
    if ! command -v -- "${cmd[0]}" >/dev/null; then  # after the env words: they may set PATH
        echo "record.sh: ${cmd[0]}: no such command (not a program on PATH, a shell builtin or an executable file)"
        exit 127
    fi
    exec "${cmd[@]}"
) 2>&1 | tee -i -a "$log"
status=${PIPESTATUS[0]}
echo "record.sh: exit status $status" >>"$log"
exit "$status"
