# Sourced by the launch scripts, not run on its own: which Python launches the workers, and the config files that
# must exist before any process starts.
#   PYTHON    the interpreter whose torch / deepspeed start the workers. Default: this clone's .venv (what `make`
#             creates) when present, else python3 from PATH. No `torchrun` / `deepspeed` on PATH is needed.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# require_file OPTION PATH: a missing file is one line naming it, and exit status 2 (a usage error, as argparse's).
require_file() {
    if [[ ! -f "$2" ]]; then
        echo "$(basename "$0"): $1 $2: no such file (relative paths start at $PWD; the shipped files are in" \
             "$ROOT/configs/)" >&2
        exit 2
    fi
}

# require_config_files ARG...: every config-file option among the arguments names an existing file.
require_config_files() {
    while (( $# )); do
        case "$1" in
            --deepspeed_config | --deepspeed-config | --p2p-compression)
                if (( $# >= 2 )); then require_file "$1" "$2"; shift; fi ;;
            --deepspeed_config=* | --deepspeed-config=* | --p2p-compression=*)
                require_file "${1%%=*}" "${1#*=}" ;;
        esac
        shift
    done
}

# The launcher commands, as arrays. TORCHRUN / DEEPSPEED (a command, split on spaces) replace the defaults.
if [[ -n "${TORCHRUN:-}" ]]; then read -ra TORCHRUN_CMD <<< "$TORCHRUN"; else
    TORCHRUN_CMD=("$PYTHON" -m torch.distributed.run); fi
if [[ -n "${DEEPSPEED:-}" ]]; then read -ra DEEPSPEED_CMD <<< "$DEEPSPEED"; else
    DEEPSPEED_CMD=("$PYTHON" -m deepspeed.launcher.runner); fi
