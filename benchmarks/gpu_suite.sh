#!/usr/bin/env bash
# On a lent GPU machine (through the `device` tool's run, carry [".whl", ".assets"]), after
# `bash benchmarks/gpu_prepare.sh` here:
#   bash benchmarks/gpu_suite.sh tests bench        # GPU tests + the issue-5/8 bench tables (~8 min on an H100)
#   bash benchmarks/gpu_suite.sh denoise            # issue 3: denoiser per-step cost on roberta-base/-large
#   bash benchmarks/gpu_suite.sh utility EPS=8      # issue 8: grape sweep rows at ε=8 on SST-2 (then EPS=3)
# Locally, to check the script itself on the CPU: SMOKE=1 bash benchmarks/gpu_suite.sh tests bench utility
#
# Everything it measures goes to $OUT (the files the tool brings back: at most 8): bench_*.json
# (one per table, `dpft bench --json`) and bench.md (the same as Markdown, benchmarks/bench_table.py),
# gpu_tests.log, denoise.json, utility_eps*.md, env.txt (versions and every command run).
# Each stage prints its commands; copy figures into docs/benchmarks.md with device and date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dpft_gpu_out}; mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
EPS=8
STAGES=()
for a in "$@"; do case $a in EPS=*) EPS=${a#EPS=} ;; *) STAGES+=("$a") ;; esac; done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests bench)

if [ "$SMOKE" = 0 ] && [ -d .whl ]; then  # the device image lacks these (device README)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
dpft() { python3 -m dpft.cli "$@"; }
{ date -u; nvidia-smi -L 2>/dev/null; python3 -c "import torch, transformers, opacus; print('torch', torch.__version__,
  'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'opacus', opacus.__version__)"; } | tee "$OUT/env.txt"

if [ "$SMOKE" = 1 ]; then  # tiny shapes, CPU: checks the plumbing, measures nothing worth recording
  BASE=(debug=tiny); LARGE=(debug=tiny); S=(--steps 1 --warmup 1); B1=(--batch 8 --length 16); B2=(--batch 8 --length 32)
else
  BASE=(model=roberta-base model.pretrained=false); LARGE=(model=roberta-large model.pretrained=false)
  S=(--steps 10 --warmup 3); B1=(--batch 32 --length 128); B2=(--batch 64 --length 256)
fi
run() { echo "+ dpft $*" | tee -a "$OUT/env.txt" >&2; dpft "$@"; }

for stage in "${STAGES[@]}"; do case $stage in
tests)
  if [ "$SMOKE" = 1 ]; then export DPFT_TEST_DEVICE=cpu; fi
  python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -3 ;;
bench)
  # issue 5's table: roberta-base B=32 L=128 (the anchors: Opacus 1.6 on an H100 62/120/126 ms)
  run bench "${BASE[@]}" runtime.physical_batch_size=64 "${B1[@]}" "${S[@]}" --json \
    --paths nonprivate,opacus-hooks,opacus-ghost,dpsgd-hooks,dpsgd-ghost,dpsgd-bk,denoise-bk,grape-ghost \
    > "$OUT/bench_base.json" || echo "bench_base failed"
  # bf16 autocast (hooks/bk only; the Opacus paths are not run under autocast)
  run bench "${BASE[@]}" engine.autocast=bf16 engine.grad_sample_mode=bk "${B1[@]}" "${S[@]}" --json --paths nonprivate,dpsgd-bk,dpsgd-hooks \
    > "$OUT/bench_base_bf16.json" || echo "bench_base_bf16 failed"
  # B=64, L=256 (anchors 213 / 349 / 423 ms, 11.1 / 40.8 / 42.8 GiB)
  run bench "${BASE[@]}" runtime.physical_batch_size=64 "${B2[@]}" "${S[@]}" --json \
    --paths nonprivate,opacus-hooks,opacus-ghost,dpsgd-ghost,dpsgd-bk > "$OUT/bench_base_b64.json" || echo "bench_base_b64 failed"
  # issue 8's memory table: roberta-large B=32 L=128 (anchors: non-private 11.0 GiB, hooks 54.3 GiB)
  run bench "${LARGE[@]}" method=grape method.rank=16 "${B1[@]}" "${S[@]}" --json \
    --paths nonprivate,opacus-hooks,dpsgd-hooks,dpsgd-ghost,dpsgd-bk,grape-hooks,grape-ghost,grape-bk \
    > "$OUT/bench_large.json" || echo "bench_large failed"
  # largest physical batch that fits, per path (CUDA only; doubling from 32, then bisection)
  [ "$SMOKE" = 1 ] || run bench "${BASE[@]}" --batch 32 --length 128 --steps 1 --warmup 1 --max-batch 4096 --json \
    --paths nonprivate,opacus-hooks,opacus-ghost,dpsgd-ghost,dpsgd-bk,grape-ghost > "$OUT/bench_maxbatch.json" \
    || echo "bench_maxbatch failed"
  python3 benchmarks/bench_table.py "$OUT"/bench_*.json | tee "$OUT/bench.md" ;;
denoise)
  python3 benchmarks/bench_denoise.py --device "$( [ "$SMOKE" = 1 ] && echo cpu || echo cuda )" \
    --models $( [ "$SMOKE" = 1 ] && echo minilm || echo roberta-base roberta-large ) --repeats 3 \
    --json "$OUT/denoise.json" 2>&1 | tail -20 ;;
utility)
  # grape sweep rows (sweeps/grape.yaml's recipe, unchanged) on real SST-2 with the carried MiniLM
  if [ "$SMOKE" = 1 ]; then U=(train.steps=2 train.batch_size=16 train.eval_at=[1,2] task.max_train_examples=200
                               task.max_eval_examples=32 task.max_length=32 method.rank=null,16)
  else U=(-j 4 runtime.physical_batch_size=256); fi  # 4 MiniLM jobs share the one GPU (dpft/sweeps/executors.py pins slot % n_gpus)
  OD=outputs/gpu-utility
  dpft sweep grape task=sst2 seed=0 privacy.epsilon="$EPS" model.name_or_path="$PWD/.assets/minilm" \
    task.data_dir="$PWD/.assets/sst2" paths.output_dir="$OD" "${U[@]}" 2>&1 | tail -15
  dpft report grape paths.output_dir="$OD" --no-plots 2>&1 | tail -25
  for f in "$OD"/reports/grape/*.md; do cp "$f" "$OUT/utility_eps${EPS}_$(basename "$f")"; done ;;
*) echo "unknown stage $stage (tests | bench | denoise | utility)"; exit 2 ;;
esac; done
ls -la "$OUT"
