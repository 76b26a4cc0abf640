#!/usr/bin/env bash
# The GPU checks of issue 12, for a short lease of one GPU machine: three calls of under 10
# minutes each, from the repository root.
#
#   bash benchmarks/gpu_checks.sh a   # versions, GPU tests, 1B full SFT MFU: varlen vs mask
#   bash benchmarks/gpu_checks.sh c   # 1B full SFT MFU with train.compile
#   bash benchmarks/gpu_checks.sh b   # 8B QLoRA vs HF Trainer + peft, packed, 2 pairs
#
# Outputs go to $OUT (a folder the caller collects; default ./gpu-out). A machine whose Python
# lacks our dependencies can be given wheels in .whl/ (ignored by git): they are unpacked into
# /tmp/site and put first on PYTHONPATH. Record what it prints in benchmarks/RESULTS.md with the
# date, the device and this command.
set -uo pipefail
part=${1:?usage: gpu_checks.sh a|b|c}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.whl/*.whl')]"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

if [ "$part" = a ]; then
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        "$PY" -c "import sys, torch, transformers, peft, bitsandbytes; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
        "$PY" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
    } 2>&1 | tee "$OUT/env.txt"
    timeout 100 "$PY" -m pytest -q -p no:cacheprovider -rA tests/test_gpu_sync.py tests/test_varlen.py \
        "tests/test_chunked_loss.py::test_bf16_autocast_matches_naive_under_autocast[cuda]" 2>&1 \
        | tee "$OUT/gpu_sync.txt" | tail -20
    timeout 150 "$PY" -m benchmarks.gpu_sft_mfu --steps 25 --warmup-steps 5 --timeout 140 2>&1 \
        | tee "$OUT/sft_mfu.txt" | tail -16
    timeout 150 "$PY" -m benchmarks.gpu_sft_mfu --steps 25 --warmup-steps 5 --timeout 140 \
        --set train.packed_attention=mask 2>&1 | tee "$OUT/sft_mfu_mask.txt" | tail -16
fi
if [ "$part" = c ]; then
    timeout 300 "$PY" -m benchmarks.gpu_sft_mfu --steps 25 --warmup-steps 8 --timeout 290 \
        --set train.compile=true 2>&1 | tee "$OUT/sft_mfu_compile.txt" | tail -16
fi
if [ "$part" = b ]; then
    date -u
    timeout 560 "$PY" -m benchmarks.gpu_qlora_8b --pairs 2 --steps 12 --warmup-steps 4 \
        --timeout 130 --model-dir /tmp/llama8b 2>&1 | tee "$OUT/qlora.txt" | tail -30
fi
