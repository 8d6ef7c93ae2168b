#!/usr/bin/env bash
# The device check of the kernels, for a lent NVIDIA GPU, in one run that fits a short lease (about 5 minutes on an H200):
# the GPU's name and clocks, the kernel micro-benchmark at Qwen3-30B-A3B's shapes with the sweep of the decode
# launches (their fastest options written to tuned.json), the decode benchmark with those options (the kernels against
# plain torch on the same weights, transformers side by side, then the full-size model, with programmatic dependent
# launch off and on), and the kernel tests compiled on the GPU (not interpreted). Each part has its own time
# limit, so one that hangs leaves the others their time. Last, evaluate_single of the embedded model on the GPU, its
# submission in a process of its own. Results go under ${OUT:-gpu_results}/.
# Usage: bash scripts/gpu_check.sh     (on a machine with CUDA, torch, triton and pytest; moebench runs from the tree)
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
py="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels (as moebench's import sets it where CUDA is; said here for the tests)
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())" \
    | tee "$out/device.txt" || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv >>"$out/device.txt" 2>&1
"$py" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__)" | tee -a "$out/device.txt"
rm -f "$out/tuned.json"  # never an earlier run's
timeout "${KERNELS_S:-200}" "$py" bench/gpu_kernels.py --sweep --tune "$out/tuned.json" \
    --out "$out/gpu_kernels.json" 2>&1 | tee "$out/gpu_kernels.txt"
# The decode with the sweep's fastest launch options (when it finished; else the built-in defaults).
tuned=()
[ -s "$out/tuned.json" ] && tuned=(MOEBENCH_TUNED="$out/tuned.json")
env "${tuned[@]}" TORCH_LOGS="${TORCH_LOGS:-perf_hints}" timeout "${DECODE_S:-300}" "$py" bench/gpu_decode.py \
    --out "$out/gpu_decode.json" 2>&1 | tee "$out/gpu_decode.txt"
workers=()
"$py" -c "import xdist" 2>/dev/null && workers=(-n 8)
timeout "${TESTS_S:-100}" "$py" -m pytest -q -p no:cacheprovider "${workers[@]}" -o addopts="" \
    tests/test_kernels.py tests/test_attention_kernel.py tests/test_flash_decoding.py tests/test_qkv_kernel.py \
    tests/test_quantized_moe.py tests/test_pdl.py >"$out/kernel_tests.txt" 2>&1
echo "kernel tests: exit $?"
tail -25 "$out/kernel_tests.txt"
# The harness end to end on the GPU: evaluate_single of the embedded model, its submission in a process of its own
# (spawned where there is CUDA, the GPU driver started anew there), validated, timed and counted.
mkdir -p "$out/evaluate"
(cd "$out/evaluate" && timeout "${EVAL_S:-120}" "$py" "$OLDPWD/main.py" --mode evaluate_single --seq-len 64 \
    --benchmark-runs 3 --warmup-runs 1) >"$out/evaluate.txt" 2>&1
echo "evaluate_single on the GPU: exit $?"
tail -15 "$out/evaluate.txt"
