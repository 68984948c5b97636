#!/usr/bin/env bash
# Rebuild the demo model from nothing, deterministically: the world's data files, the tokenizer,
# pretraining from random weights and safety tuning, both with the project's own train.py.
#
#     bash data/demo/rebuild.sh
#
# Writes data/*.jsonl (the world), data/demo/ (the model) and keeps the intermediate runs in
# runs/demo-build/. DATA, DEMO, BUILD, PYTHON and OMP_NUM_THREADS override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEED=0
DATA=${DATA:-data}
DEMO=${DEMO:-data/demo}
BUILD=${BUILD:-runs/demo-build}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)

rm -rf "$BUILD"
mkdir -p "$BUILD/init" "$DEMO"
$PY data.py demo-world --out "$DATA" --seed $SEED --force
$PY data.py demo-tokenizer --out "$BUILD/init" --seed $SEED

# The architecture: Llama with GQA and tied embeddings, 3.5M parameters (vocab_size = data.DEMO_VOCAB_SIZE).
cat > "$BUILD/init/config.json" <<JSON
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 3072,
 "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 4, "num_attention_heads": 4,
 "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "max_position_embeddings": 512, "tie_word_embeddings": true, "initializer_range": 0.02,
 "bos_token_id": 0, "eos_token_id": [2, 0], "torch_dtype": "float32"}
JSON

# 1. pretraining: general text + helpful chats, from random weights
$PY train.py --method full --init "$BUILD/init/config.json" --task "$DATA/demo_pretrain.jsonl" \
    --out "$BUILD/pretrain" --seed $SEED --batch-size 32 --max-len 128 --epochs 2 \
    --lr 2e-3 --min-lr 2e-4 --warmup 20 --eval-every 0 --ckpt-every 0
# 2. safety tuning: refusals for unsafe requests, answers for safe and risky-looking safe ones
$PY train.py --method full --ckpt "$BUILD/pretrain/model" --task "$DATA/demo_safety.jsonl" \
    --out "$BUILD/safety" --seed $SEED --batch-size 32 --max-len 128 --epochs 1 \
    --lr 5e-4 --min-lr 5e-5 --warmup 10 --eval-every 0 --ckpt-every 0

for f in model.safetensors config.json tokenizer.json tokenizer_config.json generation_config.json; do
    cp "$BUILD/safety/model/$f" "$DEMO/$f"
done
echo "rebuilt $DEMO in $(( $(date +%s) - start ))s"
