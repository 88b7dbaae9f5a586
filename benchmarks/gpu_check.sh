#!/usr/bin/env bash
# The GPU half of issue 6 as one prepared run, sized for a 15-minute device lease (machine
# start included; the stages' limits add up to 9.75 minutes): the CUDA-only tests, then
# `spadeformer bench train` up to 32k tokens with the automatic attention backend (FlexAttention
# on CUDA) and with blocked SDPA forced, Mega's variants (laplace attention, rotary bias), then
# `bench generate`. Each stage has its own time
# limit, so a slow stage never costs the results of the others; everything lands in one
# tarball (the device tool returns at most 8 files).
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on the GPU machine (its python3 has torch)
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/gpu-smoke   # try the script here
#
# Nothing is installed: the package runs from src/ (PYTHONPATH). Results:
# OUT_DIR/gpu_check.tar.gz holding env.txt, train-flex/, train-sdpa/, train-mega/, generate/
# and a log per
# stage (pytest.log is the tests' output).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
work=$(mktemp -d)

if [ "${SMOKE:-0}" = 1 ]; then  # seconds, not minutes: checks the plumbing, measures nothing
  lengths=64,128 contexts=64,128 limit=120 mega_lengths=64
  shape=(--d-model 32 --n-layers 2 --n-heads 2 --d-state 8 --window 16 --chunk 16)
  tests=(tests/ops/test_flex_attn.py -k "not compiled")
else
  lengths=1024,4096,16384,32768 contexts=1024,16384,65536 limit=180 mega_lengths=4096,16384
  shape=()
  tests=(tests/ops/test_flex_attn.py tests/ops/test_local_attn.py tests/test_attention.py
         tests/test_mega.py::test_mega_block_on_cuda_matches_cpu_fp64)
fi
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to NAME.log
  local name=$1 seconds=$2; shift 2
  echo "== $name (limit ${seconds}s): $*"
  timeout "$seconds" "$@" >"$work/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s in all"
}

{ nvidia-smi 2>&1 || true
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; } >"$work/env.txt" 2>&1

# the compiled FlexAttention kernel against the dense reference (values and gradients), and
# the attention tests on whatever device the tests pick
stage pytest 120 "$py" -m pytest -q -p no:cacheprovider "${tests[@]}"

bench=("$py" -m spadeformer.cli bench train --lengths "$lengths" --device "$device"
       --in-process --warmup 2 --repeats 5 --max-seconds 60 "${shape[@]}")
models=transformer-full-eager,transformer-full,transformer-window,transformer-chunk,s4
models+=,spade-s4-window,spade-s4-chunk,mega-chunk
stage train-flex "$limit" "${bench[@]}" --models "$models" --out "$work/train-flex"
SPADEFORMER_ATTENTION_BACKEND=sdpa stage train-sdpa 120 "${bench[@]}" \
  --models transformer-window,transformer-chunk,spade-s4-window,spade-s4-chunk \
  --out "$work/train-sdpa"
stage train-mega 75 "${bench[@]}" --lengths "$mega_lengths" --max-seconds 20 \
  --models mega-chunk,mega-chunk:mega_attention_fn=laplace,mega-chunk:position=rotary \
  --out "$work/train-mega"
stage generate 90 "$py" -m spadeformer.cli bench generate --contexts "$contexts" \
  --device "$device" --tokens 32 --max-seconds 60 "${shape[@]}" --out "$work/generate"

mkdir -p "$out"
tar czf "$out/gpu_check.tar.gz" -C "$work" .
echo "results: $out/gpu_check.tar.gz ($(du -h "$out/gpu_check.tar.gz" | cut -f1))"
