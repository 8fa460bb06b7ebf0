#!/usr/bin/env bash
# GPU benchmarks (probe and train step) in one go, for a machine with one CUDA GPU:
#     OUT=benchmarks/results bash benchmarks/run_gpu.sh
# Each step has its own time limit so that one slow step cannot eat the others.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
# SVD cost per 197 x 197 map on this GPU (what the rank costs per image-block-head)
$PY - <<'PYEOF'
import time, torch
a = torch.rand(384, 197, 197, device="cuda").softmax(-1)
for f, name in ((torch.linalg.svdvals, "svdvals"),):
    f(a); torch.cuda.synchronize(); t = time.perf_counter(); f(a); torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - t) / 384 * 1e3:.3f} ms per 197x197 map (batch of 384)")
PYEOF
timeout 150 $PY benchmarks/bench_probe.py --device cuda --images 256 --batch 64 --repeats 1 --rank-images 2 \
    --modes forward,probe,norank,naive --timeout 60 --out "$OUT/bench_probe_cuda.json" 2>&1 | tee "$OUT/bench_probe_cuda.txt"
timeout 90 $PY benchmarks/bench_train_step.py --device cuda --bf16 --batch 64 --steps 5 --rounds 3 \
    --out "$OUT/bench_train_step_cuda_bf16.json" 2>&1 | tee "$OUT/bench_train_step_cuda_bf16.txt"
timeout 180 $PY benchmarks/bench_train_step.py --device cuda --bf16 --compile --batch 64 --steps 5 --rounds 3 \
    --out "$OUT/bench_train_step_cuda_bf16_compile.json" 2>&1 | tee "$OUT/bench_train_step_cuda_bf16_compile.txt"
timeout 90 $PY benchmarks/bench_train_step.py --device cuda --bf16 --unfused --theta-einsum --batch 64 --steps 5 \
    --rounds 3 --out "$OUT/bench_train_step_cuda_bf16_unfused_einsum.json" 2>&1 | tee "$OUT/bench_train_step_einsum.txt"
# Re-attention implementations (reference Conv2d+BN / PyTorch fast path / Triton kernel): GPU parity, then the
# op alone, then DeepViT-32B vs ViT-32B training steps, bf16, batch 64, eager and compiled (compiled runs use the
# PyTorch fast path: the Triton kernel steps aside under torch.compile, so ':torch' would duplicate the default there)
timeout 120 $PY benchmarks/bench_reattention_gpu.py --out "$OUT/reattention_gpu.json" 2>&1 \
    | tee "$OUT/reattention_gpu.txt"
timeout 150 $PY benchmarks/bench_train_step.py --device cuda --bf16 --batch 64 --steps 5 --rounds 3 \
    --models vit_32b,deepvit_32b:ref,deepvit_32b:torch,deepvit_32b \
    --out "$OUT/train_step_gpu_bf16_eager_reattn.json" 2>&1 | tee "$OUT/train_step_gpu_bf16_eager_reattn.txt"
timeout 300 $PY benchmarks/bench_train_step.py --device cuda --bf16 --compile --batch 64 --steps 5 --rounds 3 \
    --models vit_32b,deepvit_32b:ref,deepvit_32b \
    --out "$OUT/train_step_gpu_bf16_compile_reattn.json" 2>&1 | tee "$OUT/train_step_gpu_bf16_compile_reattn.txt"
