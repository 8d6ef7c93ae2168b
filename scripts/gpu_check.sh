#!/usr/bin/env bash
# The device check of the kernels, for a lent NVIDIA GPU: the kernel tests compiled on the GPU (not interpreted),
# then the micro-benchmark at Qwen3-30B-A3B's shapes and the full-size decode benchmark. Results go under ${OUT:-gpu_results}/.
# Usage: bash scripts/gpu_check.sh        (on a machine with CUDA; set-up included)
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
    python -m pip install -q -e ".[test]" >"$out/pip.log" 2>&1; }
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())" \
    | tee "$out/device.txt" || exit 2
unset TRITON_INTERPRET
python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_attention_kernel.py \
    tests/test_flash_decoding.py tests/test_qkv_kernel.py tests/test_quantized_moe.py 2>&1 | tail -40 \
    | tee "$out/kernel_tests.txt"
python bench/gpu_kernels.py --out "$out/gpu_kernels.json" 2>&1 | tee "$out/gpu_kernels.txt"
python bench/gpu_decode.py --out "$out/gpu_decode.json" 2>&1 | tee "$out/gpu_decode.txt"
