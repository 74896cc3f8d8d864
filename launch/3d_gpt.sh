#!/usr/bin/env bash
# 3D-parallel GPT: tensor 2 x pipeline 2 x data 2 = 8 processes (CPU: gloo; 8 GPUs: nccl, unchanged).
# D-Lion (1-bit MaVo votes) across each data-parallel group, compressed activations/gradients across the pipeline.
#   launch/3d_gpt.sh                    # STEPS=50 iterations, writes runs/3d/summary.json
#   STEPS=2 launch/3d_gpt.sh            # a short run; extra arguments override the ones below (last one wins)
# summary.json: {"tp", "pp", "dp", "steps", "losses", "dp_replicas_identical", "wire", ...}; replicas, tied
# embeddings and TP-replicated parameters are compared across ranks by checksum at the end.
# torchrun here is `$PYTHON -m torch.distributed.run`, PYTHON defaulting to this clone's .venv/bin/python
# (launch/_common.sh); TORCHRUN=... replaces that command. COMPRESSION: the p2p compression JSON.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
COMPRESSION=${COMPRESSION:-$ROOT/configs/compression/topk10_q8.json}
require_config_files --p2p-compression "$COMPRESSION" "$@"
exec "${TORCHRUN_CMD[@]}" --nproc_per_node "${NPROC:-8}" --master_port "${MASTER_PORT:-29500}" \
    -m distlion_ds.megatron.pretrain_gpt \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
    --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \
    --micro-batch-size 2 --global-batch-size 8 \
    --train-iters "${STEPS:-50}" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 0 --lr-decay-style cosine \
    --optimizer distlion --aggregation mavo --p2p-compression "$COMPRESSION" \
    --data-path data_cache/stdlib --eval-interval 25 --eval-iters 2 --log-interval 5 \
    --out runs/3d "$@"
