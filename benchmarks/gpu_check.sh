#!/usr/bin/env bash
# The device check of nas-split on one GPU: the `gpu` tests, the training-loop benchmark, energy-aware growth
# priced by the GPU's measured latency table against the analytic energy model (bench_cost_models.py) and the
# full-data Fashion-MNIST comparison, each with its own time limit (13 minutes in all); every result lands in one
# folder.  The comparisons are resumable: a second call with the same RESULTS_DIR continues where a limit stopped
# them.  GPU_CHECK_STEPS picks steps (default "tests train cost compare").
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR
#
# Installs nothing from the network.  The device image lacks a few of nas-split's pure-Python dependencies:
# put their wheels in .whl/ beforehand (see docs/gpu.md, "Device check"), and Fashion-MNIST's four IDX files in
# .data/fashion-mnist/ (from Debian's dataset-fashion-mnist).  GPU_CHECK_SMOKE=1 runs every step tiny, on
# whatever device there is (that is how it is tried on a CPU before a GPU is spent on it).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nas-split-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/nas-split-site:${PYTHONPATH:-}
fi
# the project's own metadata (its entry points register the baselines), for a checkout that is not installed
if ! ${PYTHON:-python3} -c "import importlib.metadata as m; m.distribution('nas-split')" 2>/dev/null; then
  ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/nas-split-meta \
    . > /dev/null 2>&1 && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/nas-split-meta
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -d .data/fashion-mnist ] && export NAS_SPLIT_DATA=$PWD/.data
py=${PYTHON:-python3}
{ $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; nvidia-smi -L 2>/dev/null; } \
  | tee "$out/device.txt"

steps_run=" ${GPU_CHECK_STEPS:-tests train cost compare} "
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  tests="tests/test_precision_and_device.py"; steps=2; repeats=1
  cost=(--set seeds=[0,1] --set rounds=1 --set seed_epochs=1 --set train.epochs=1
        --set dataset_options.train_size=500 --set target_mmacs=[1.5] --repeats 1)
  compare=(--config benchmarks/configs/fashion_mnist_gpu.yaml --methods scratch,fast --seeds 0 --rounds 1
           --seed-epochs 1 --epochs 1 --set dataset=digits --set train.accelerator=auto --set "target_mmacs=[1.5]")
else
  tests="tests/test_precision_and_device.py -m gpu"; steps=50; repeats=3; cost=()
  compare=(--config benchmarks/configs/fashion_mnist_gpu.yaml)
fi

touch "$out/summary.txt"
if [[ $steps_run == *" tests "* ]]; then
  echo "== gpu tests" | tee -a "$out/summary.txt"
  timeout 150 $py -m pytest -q -p no:cacheprovider $tests 2>&1 | tee "$out/tests.txt" | tail -3 | tee -a "$out/summary.txt"
fi

if [[ $steps_run == *" train "* ]]; then
  echo "== training loop (benchmarks/bench_train.py)" | tee -a "$out/summary.txt"
  timeout 80 $py benchmarks/bench_train.py --steps $steps --repeats $repeats --json "$out/bench_train.json" 2>&1 \
    | grep -v Warning | tee -a "$out/summary.txt"
fi

if [[ $steps_run == *" cost "* ]]; then
  echo "== energy-aware growth under the measured latency table and the analytic model" | tee -a "$out/summary.txt"
  start=$(date +%s)
  export NAS_SPLIT_CACHE=$out/cache
  timeout 240 $py benchmarks/bench_cost_models.py --out "$out/cost_models" "${cost[@]}" > "$out/cost_models.txt" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
  grep -v Warning "$out/cost_models.txt" | tail -12 | tee -a "$out/summary.txt"
  cp "$out"/cache/latency/*.json "$out/" 2>/dev/null
fi

if [[ $steps_run == *" compare "* ]]; then
  echo "== compare on full Fashion-MNIST" | tee -a "$out/summary.txt"
  start=$(date +%s)
  timeout 300 $py -m nas_split.cli compare "${compare[@]}" --set out="$out/compare" >> "$out/compare.txt" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
  tail -15 "$out/compare.txt" | tee -a "$out/summary.txt"
fi
