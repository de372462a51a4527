#!/usr/bin/env bash
# One pass of the checks that need a CUDA GPU: the suite with CUDA present, a real run and sampling on the
# GPU, and the training-step benchmark beside the references. Expects the wheels of ddpm and of whatever the
# machine lacks in .whl/ (see scripts/README.md); writes logs to $OUT (or ./gpu_out).
set -uo pipefail
REPO=$PWD
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ddpm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), ddpm.__file__)"

run() { echo "== $*"; "$@"; echo "rc=$?"; }
python3 -m pytest -q -m "not slow" -p no:cacheprovider tests 2>&1 | tail -5 | tee "$OUT/pytest.log"
cd /tmp && rm -rf gpu_run && mkdir gpu_run && cd gpu_run
run timeout 150 ddpm-train device=cuda hydra.run.dir=run 2>&1 | tee "$OUT/train_digits_cuda.log"
run ddpm-sample ckpt=run/checkpoints/last.pt device=cuda n=64 seed=0 out=s1 save_images=true
run ddpm-sample ckpt=run/checkpoints/last.pt device=cuda n=64 seed=0 out=s2 save_images=true
cmp -s s1/grid.png s2/grid.png && echo "same seed, same grid on cuda" || echo "grids differ on cuda"
# resume on the GPU: SIGTERM mid-run, then resume=auto; the CUDA RNG and optimizer state travel through CPU
ddpm-train device=cuda steps=600 checkpoint_every=100 hydra.run.dir=cut > "$OUT/resume_cuda.log" 2>&1 &
sleep 25; kill -TERM $!; wait $!; echo "stopped rc=$? (143 expected)" | tee -a "$OUT/resume_cuda.log"
run ddpm-train hydra.run.dir=cut resume=auto 2>&1 | tail -3 | tee -a "$OUT/resume_cuda.log"
cp run/samples/step_001500.png "$OUT/digits_cuda_grid.png" 2>/dev/null
cp run/forward.png "$OUT/digits_cuda_forward.png" 2>/dev/null
cd "$REPO"
for shape in seed28 cifar32; do
  run timeout 120 python3 scripts/bench_train.py --shape $shape --steps 30 --repeats 3 2>&1 | tee -a "$OUT/bench.log"
done
# data-parallel on one GPU: what torchrun --nproc-per-node=1 costs against the plain run (same job)
run timeout 200 python3 scripts/bench_ddp.py --nproc 1 --steps 300 --repeats 2 device=cuda 2>&1 | tee -a "$OUT/ddp.log"
# and with every GPU the machine has, if more than one
n=$(nvidia-smi -L | wc -l)
[ "$n" -gt 1 ] && run timeout 200 python3 scripts/bench_ddp.py --nproc "$n" --steps 300 --repeats 2 device=cuda 2>&1 | tee -a "$OUT/ddp.log"
