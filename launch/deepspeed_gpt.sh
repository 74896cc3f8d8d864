#!/usr/bin/env bash
# GPT pretraining with the DeepSpeed launcher; CPU (gloo) and GPUs (nccl) alike.
#   launch/deepspeed_gpt.sh [CONFIG] [WORKERS] [-- extra pretrain_gpt arguments]
#   e.g. launch/deepspeed_gpt.sh configs/deepspeed/dlion_mavo.json 4 --train-iters 300
# CONFIG: any file of configs/deepspeed/ (adamw_baseline, dlion_mavo, dlion_avg; *_bf16 and lion_global: GPU only).
# The launcher is `$PYTHON -m deepspeed.launcher.runner` (the `deepspeed` command), PYTHON defaulting to this
# clone's .venv/bin/python (launch/_common.sh); DEEPSPEED=... replaces that command.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
CONFIG=${1:-$ROOT/configs/deepspeed/dlion_mavo.json}
WORKERS=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
require_config_files --deepspeed_config "$CONFIG" "$@"
exec "${DEEPSPEED_CMD[@]}" --num_gpus "$WORKERS" --master_port "${MASTER_PORT:-29500}" \
    --module distlion_ds.deepspeed.pretrain_gpt --deepspeed_config "$CONFIG" "$@"
