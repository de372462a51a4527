#!/usr/bin/env bash
# The checks that need a CUDA GPU, in stages, most important first: the fast path's own check on every
# kind of run (the default, class-conditional, learned variances, ho2020, fine-tuning from an exported
# diffusers folder: does the compiled and captured step pass, or fall back, and why), the GPU's own tests
# (captured step against eager, data held on the GPU, samplers without a sync), the real ddpm-train loop
# on the ho2020 U-Net at 32x32x3, the training and sampling benchmarks beside the references, one-GPU
# torchrun, and the default digits job. Expects the wheels of ddpm (`pip wheel --no-deps -w .whl .`) and of whatever
# the machine lacks in .whl/ (the bench extra's denoising-diffusion-pytorch and diffusers, and what they
# need); writes logs to $OUT (or ./gpu_out).
#
#   bash scripts/gpu_check.sh                      # every stage (about 14 minutes on an H100: split it)
#   bash scripts/gpu_check.sh paths tests loop     # some of them: paths tests loop train sample ddp digits suite
set -uo pipefail
REPO=$PWD
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES=${*:-paths tests loop train sample ddp digits}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$REPO/scripts PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ddpm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), ddpm.__file__)" | tee -a "$OUT/gpu.txt"

run() { echo "== $*"; "$@"; echo "rc=$?"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has paths; then
  # each kind of run through the real loop on the default fast path (compile and CUDA graph): its header
  # names the path that ran, and a "warning: the ... step failed its check (...)" line says why not
  cd /tmp && rm -rf paths && mkdir paths && cd paths
  quick="device=cuda steps=200 log_every=50 sample_every=0 checkpoint_every=0 forward_n=0 sample_n=16"
  ho="model=ho2020 model.dim=64 model.dim_mults=[1,2,2] data.image_size=32 data.channels=3"
  i=0
  for kind in default class_cond=true learn_sigma=true "$ho" "$ho class_cond=true learn_sigma=true"; do
    args=$([ "$kind" = default ] && echo "" || echo "$kind")
    dir=run_$i; i=$((i + 1))
    run timeout 300 ddpm-train $quick $args hydra.run.dir=$dir 2>&1 | grep -E "^ddpm-train \||warning|error|^done" | tee -a "$OUT/paths.log"
    tail -1 $dir/metrics.jsonl | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$kind:', r['path'], f\"{r['img_per_s']:,.0f} img/s\")" | tee -a "$OUT/paths.log"
  done
  # the imported network: an export as a diffusers folder, sampled and fine-tuned from
  run ddpm-export ckpt=run_3/checkpoints/last.pt format=diffusers out=ho_pipe 2>&1 | tee -a "$OUT/paths.log"
  run ddpm-sample ckpt=ho_pipe device=cuda n=16 2>&1 | tail -2 | tee -a "$OUT/paths.log"
  run timeout 300 ddpm-train init=ho_pipe $quick data.image_size=32 data.channels=3 hydra.run.dir=run_init 2>&1 | grep -E "^ddpm-train \||fine-tuning|warning|error|^done" | tee -a "$OUT/paths.log"
  tail -1 run_init/metrics.jsonl | tee -a "$OUT/paths.log"
  cd "$REPO"
fi

if has tests; then
  # the tests that skip without a GPU, and the CPU compile check (the suite's own tolerances)
  run timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_fast_step.py tests/test_resident.py \
    tests/test_sampling.py -k "cuda or captured or fast_path or gpu or never_wait or compiled" 2>&1 | tail -15 | tee "$OUT/tests.log"
fi

if has loop; then
  # Ho et al.'s 35.7M U-Net at 32x32x3, batch 128, through the real loop (data on the GPU, EMA, logging,
  # the final checkpoint and grid); the digits at 32x32x3 need no download and cost what CIFAR-10 costs
  cd /tmp && rm -rf ho_loop
  run timeout 420 ddpm-train model=ho2020 data.image_size=32 data.channels=3 batch_size=128 steps=600 \
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

if has train; then
  for shape in seed28 cifar32 cat128; do
    run timeout 240 python3 scripts/bench_train.py --shape $shape --impl ddpm,lucidrains,diffusers --steps 20 --repeats 5 2>&1 | tee -a "$OUT/bench_train.log"
  done
  # what each lever gives at seed28: eager fp32, then compile, then the CUDA graph, then bf16
  for choice in "--precision fp32 --compile false --cuda-graph false" "--precision fp32 --compile true --cuda-graph false" \
                "--precision fp32 --compile true --cuda-graph true" "--precision bf16 --compile true --cuda-graph true"; do
    run timeout 150 python3 scripts/bench_train.py --shape seed28 --impl ddpm --steps 20 --repeats 5 $choice 2>&1 | tail -2 | tee -a "$OUT/levers.log"
  done
fi

if has sample; then
  for shape in seed28 cifar32; do
    run timeout 240 python3 scripts/bench_sample.py --shape $shape --n 256 --repeats 3 2>&1 | tee -a "$OUT/bench_sample.log"
  done
  run timeout 240 python3 scripts/bench_sample.py --shape cifar32 --model ho2020 --sampler ddim --sample-steps 50 --n 2500 --repeats 3 2>&1 | tee -a "$OUT/bench_sample.log"
fi

if has digits; then
  # the default job on the GPU, grids included; the same seed gives the same grid
  cd /tmp && rm -rf gpu_run && mkdir gpu_run && cd gpu_run
  /usr/bin/time -f "default digits job on the GPU: %e s wall" ddpm-train device=cuda hydra.run.dir=run 2>&1 | tail -6 | tee "$OUT/digits_cuda.log"
  run ddpm-sample ckpt=run/checkpoints/last.pt device=cuda n=64 seed=0 out=s1
  run ddpm-sample ckpt=run/checkpoints/last.pt device=cuda n=64 seed=0 out=s2
  cmp -s s1/grid.png s2/grid.png && echo "same seed, same grid on cuda" | tee -a "$OUT/digits_cuda.log"
  cp run/samples/step_001500.png "$OUT/digits_cuda_grid.png" 2>/dev/null
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
