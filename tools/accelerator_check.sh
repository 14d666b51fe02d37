#!/usr/bin/env bash
# Every accelerator check and benchmark of ponder in one run, for a GPU or TPU host with jax for
# that platform installed (device time is scarce: build and test on CPU first). Prints everything
# to stdout; with OUT set, also writes it to $OUT/accelerator_check.log.
#
#   bash tools/accelerator_check.sh              # PY=python3 by default; PY=.venv/bin/python to choose
#   QUICK=1 bash tools/accelerator_check.sh      # kernel tests and the smaller benchmarks only
set -uo pipefail
PY=${PY:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log=${OUT:+$OUT/accelerator_check.log}
exec > >(tee ${log:+"$log"}) 2>&1

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
ponder() { timeout "${LIMIT:-900}" "$PY" -m tools.cli "$@"; }

step "devices"
"$PY" -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

step "which kernels the 1b config uses here"
ponder info --config models/1b | sed -n 1,12p

step "kernels on this device against XLA (tests/test_accelerator.py), then the CPU-interpret tests"
timeout 900 "$PY" -m pytest -q -p no:cacheprovider tests/test_accelerator.py tests/test_mixed_precision.py -x

step "train: tiny config, then the 1b model in bfloat16 (MFU against the data-sheet peak)"
variants=(--1b-variant model.attention=xla --1b-variant model.loss_vocab_chunk=16032)
[ -n "${QUICK:-}" ] || variants+=(--1b-variant "model.param_dtype=bfloat16,optimizer.master_weights=true"
                                  --1b-variant "model.remat=full")
ponder bench train --config tiny --steps 10 "${variants[@]}"

step "decode roofline: 1b, bfloat16 weights, batch 64 and 256 against HBM bandwidth"
ponder bench search --roofline --config models/1b model.param_dtype=bfloat16 \
  --roofline-batches 64,256 --prompt-len 512 --new-tokens 128 --repeats 3
ponder bench search --roofline --config models/1b model.param_dtype=bfloat16 model.decode_attention=xla \
  --roofline-batches 64,256 --prompt-len 512 --new-tokens 128 --repeats 3

if [ -z "${QUICK:-}" ]; then
  step "tree-search overhead at the 1b size: beam and MCTS against plain sampling"
  ponder bench search --overhead --config models/1b model.param_dtype=bfloat16 --problems 16 --repeats 2
fi
step "done"
