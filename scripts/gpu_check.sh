#!/usr/bin/env bash
# The checks that need a CUDA GPU, in stages, most important first: the fast path's own check on each
# kind of run (paths: the default and a class-conditional learned-variance U-Net; loop: Ho et al.'s U-Net
# in the real loop; init: fine-tuning from that run exported as a diffusers folder; each header says
# whether the compiled and captured step passed, or a warning why it fell back), the training benchmark
# beside the references on three shapes, the sampling figures, lever by lever at seed28, one-GPU torchrun,
# the GPU's own tests and the default digits job. Expects the wheels of ddpm (`pip wheel --no-deps -w
# .whl .`) and of whatever the machine lacks in .whl/ (hydra-core and its needs, the bench extra's
# denoising-diffusion-pytorch and diffusers, and theirs); writes logs to $OUT (or ./gpu_out). Inductor's
# cache sits in /tmp/inductor, so a second call on the same machine compiles a graph it has seen once only.
#
#   bash scripts/gpu_check.sh                      # every stage (over 10 minutes on an H200: split it)
#   bash scripts/gpu_check.sh paths loop init      # some of them: paths loop init train sample levers ddp tests digits suite
set -uo pipefail
REPO=$PWD
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES=${*:-paths loop init train sample levers ddp tests digits}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$REPO/scripts PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ddpm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), ddpm.__file__)" | tee -a "$OUT/gpu.txt"

run() { echo "== $*"; "$@"; echo "rc=$?"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

summary() {  # the path that ran and the rate of the last logged interval, from a run's metrics.jsonl
  tail -1 "$2/metrics.jsonl" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$1:', r.get('path'), f\"{r['img_per_s']:,.0f} img/s\")"
}
keep() { grep -E "^ddpm-train \||fine-tuning|warning|error|Error|^done|^rc="; }
quick="device=cuda steps=100 log_every=50 sample_every=0 checkpoint_every=0 forward_n=0 sample_n=16"

if has paths; then
  # the default U-Net, then the class-conditional one with learned variances (labels in the captured
  # step, the 2C-channel output), through the real loop on the default fast path (compile and CUDA graph)
  mkdir -p /tmp/paths && cd /tmp/paths && rm -rf run_*
  run timeout 240 ddpm-train $quick hydra.run.dir=run_default 2>&1 | keep | tee -a "$OUT/paths.log"
  summary default run_default | tee -a "$OUT/paths.log"
  run timeout 240 ddpm-train $quick class_cond=true learn_sigma=true hydra.run.dir=run_cond 2>&1 | keep | tee -a "$OUT/paths.log"
  summary "class_cond learn_sigma" run_cond | tee -a "$OUT/paths.log"
  cd "$REPO"
fi

if has loop; then
  # Ho et al.'s 35.7M U-Net at 32x32x3, batch 128, through the real loop (data on the GPU, EMA, logging,
  # the final checkpoint and grid); the digits at 32x32x3 need no download and cost what CIFAR-10 costs
  mkdir -p /tmp/paths && cd /tmp/paths && rm -rf ho_loop
  run timeout 300 ddpm-train model=ho2020 data.image_size=32 data.channels=3 batch_size=128 steps=600 \
    log_every=100 sample_every=0 checkpoint_every=0 forward_n=0 sample_n=16 hydra.run.dir=ho_loop 2>&1 | tee "$OUT/ho2020_loop.log"
  cp ho_loop/metrics.jsonl "$OUT/ho2020_metrics.jsonl" 2>/dev/null
  python3 - "$OUT/ho2020_metrics.jsonl" <<'EOF' | tee -a "$OUT/ho2020_loop.log"
import json, statistics, sys
rows = [json.loads(r) for r in open(sys.argv[1]) if '"img_per_s"' in r]
rates = [r["img_per_s"] for r in rows[1:]]  # the first interval holds compilation and capture
print(f"ho2020 32x32x3 batch 128, real loop: median {statistics.median(rates):,.0f} img/s over {len(rates)} intervals "
      f"(target 7,100); peak {max(r.get('peak_mem_gb', 0) for r in rows):.2f} GB")
EOF
  cd "$REPO"
fi

if has init; then
  # the imported network: the ho2020 run exported as a diffusers folder, sampled and fine-tuned from
  cd /tmp/paths && rm -rf ho_pipe run_init
  run ddpm-export ckpt=ho_loop/checkpoints/last.pt format=diffusers out=ho_pipe 2>&1 | tail -2 | tee -a "$OUT/paths.log"
  run ddpm-sample ckpt=ho_pipe device=cuda n=16 out=ho_pipe_samples 2>&1 | tail -2 | tee -a "$OUT/paths.log"
  run timeout 240 ddpm-train init=ho_pipe $quick data.image_size=32 data.channels=3 hydra.run.dir=run_init 2>&1 | keep | tee -a "$OUT/paths.log"
  summary "init=diffusers folder (ho2020)" run_init | tee -a "$OUT/paths.log"
  cd "$REPO"
fi

if has train; then
  for shape in ${TRAIN_SHAPES:-seed28 cifar32 cat128}; do
    run timeout 200 python3 scripts/bench_train.py --shape $shape --impl ddpm,lucidrains,diffusers --steps 20 --repeats 3 2>&1 | tee -a "$OUT/bench_train.log"
  done
fi

if has levers; then
  # what each lever gives at seed28: eager, then compile, then the CUDA graph, each in fp32 and bf16
  for choice in "--compile false --cuda-graph false" "--compile true --cuda-graph false" "--compile true --cuda-graph true"; do
    run timeout 150 python3 scripts/bench_train.py --shape seed28 --impl ddpm --precision fp32,bf16 --steps 20 --repeats 3 $choice 2>&1 | tail -3 | tee -a "$OUT/levers.log"
  done
fi

if has sample; then
  # the 1,000-step ancestral loop beside lucidrains', and DDIM-50 on the ho2020 U-Net at CIFAR's shape
  run timeout 150 python3 scripts/bench_sample.py --shape seed28 --n 256 --repeats 3 2>&1 | tee -a "$OUT/bench_sample.log"
  run timeout 150 python3 scripts/bench_sample.py --shape cifar32 --model ho2020 --sampler ddim --sample-steps 50 --n 2500 --repeats 3 --no-reference 2>&1 | tee -a "$OUT/bench_sample.log"
fi

if has tests; then
  # the tests that skip without a GPU, and the CPU compile check (the suite's own tolerances)
  run timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_fast_step.py tests/test_resident.py \
    tests/test_sampling.py -k "cuda or captured or fast_path or gpu or never_wait or compiled" 2>&1 | tail -15 | tee "$OUT/tests.log"
fi

if has digits; then
  # the default job on the GPU, grids included; the same seed gives the same grid
  cd /tmp && rm -rf gpu_run && mkdir gpu_run && cd gpu_run
  /usr/bin/time -f "default digits job on the GPU: %e s wall" ddpm-train device=cuda hydra.run.dir=run 2>&1 | tail -6 | tee "$OUT/digits_cuda.log"
  run ddpm-sample ckpt=run/checkpoints/last.pt device=cuda n=64 seed=0 out=s1
  run ddpm-sample ckpt=run/checkpoints/last.pt device=cuda n=64 seed=0 out=s2
  cmp -s s1/grid.png s2/grid.png && echo "same seed, same grid on cuda" | tee -a "$OUT/digits_cuda.log"
  cp "$(ls run/samples/step_*.png | tail -1)" "$OUT/digits_cuda_grid.png" 2>/dev/null
  cd "$REPO"
fi

if has ddp; then
  # torchrun with one rank against the plain run (same job, compiled: compile under DDP)
  run timeout 200 python3 scripts/bench_ddp.py --nproc 1 --steps 300 --repeats 2 device=cuda 2>&1 | tee -a "$OUT/ddp.log"
  n=$(nvidia-smi -L | wc -l)
  [ "$n" -gt 1 ] && run timeout 200 python3 scripts/bench_ddp.py --nproc "$n" --steps 300 --repeats 2 device=cuda 2>&1 | tee -a "$OUT/ddp.log"
fi

if has suite; then
  run timeout 600 python3 -m pytest -q -m "not slow" -p no:cacheprovider tests 2>&1 | tail -5 | tee "$OUT/pytest.log"
fi
