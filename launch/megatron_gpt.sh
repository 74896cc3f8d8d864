#!/usr/bin/env bash
# GPT pretraining on megatron-core under torchrun; CPU (gloo) and GPUs (nccl) alike.
#   NPROC=4 launch/megatron_gpt.sh [pretrain_gpt arguments]
#   e.g. NPROC=4 launch/megatron_gpt.sh --pipeline-model-parallel-size 2 --num-layers 4 --global-batch-size 8 \
#            --micro-batch-size 2 --train-iters 100 --p2p-compression configs/compression/topk10_q8.json
# Arguments: python -m distlion_ds.megatron.pretrain_gpt --help (Megatron-LM names; dp = NPROC / (tp x pp)).
# torchrun here is `$PYTHON -m torch.distributed.run`, PYTHON defaulting to this clone's .venv/bin/python
# (launch/_common.sh); TORCHRUN=... replaces that command.
# Multi-node: pass torchrun's own options through TORCHRUN_ARGS (e.g. "--nnodes 2 --node_rank 0 --master_addr h0").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_config_files "$@"
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "${TORCHRUN_CMD[@]}" --nproc_per_node "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" ${TORCHRUN_ARGS:-} \
    -m distlion_ds.megatron.pretrain_gpt "$@"
