#!/usr/bin/env bash
# Every GPU check and figure of one short GPU lease, run on the GPU machine from the repository root.
#
#   OUT=/some/dir bash tests/bench/gpu_session.sh speed               # CUDA tests, speed, FLOPs, compile
#   OUT=/some/dir STEPS=3000 bash tests/bench/gpu_session.sh quality   # CUB-100 at 128 px, then assign
#   OUT=/some/dir DEADLINE_S=540 bash tests/bench/gpu_session.sh all   # both; the CUB run gets the time left
#   OUT=/some/dir MINUTES=7.5 bash tests/bench/gpu_session.sh curves    # learning curves against labels, side by side
#   OUT=/some/dir STEPS=3500 DEADLINE_S=580 bash tests/bench/gpu_session.sh lease   # CUDA tests beside quality (537 s)
#
# The quality stage ends with tests/bench/large_folder.py --run: assign of the CUB-100 files with the new
# model on the GPU (cold cache, built first, warm; fp32 and bf16) against the pure decode of the same files,
# and the same on the 10,000 CIFAR-10 test JPEGs when .gpu/cifar10-test.tar.gz (cifar10/images/CLASS/test_*)
# is there, in the time DEADLINE_S leaves. The lease stage is the quality stage with tests/test_cuda.py run
# beside the training (so the CUB run shares the GPU for the tests' first minute).
#
# Without STEPS, the CUB run's step count is what fits before DEADLINE_S (seconds from the start of the
# script), at the 128 px bf16 step time the speed stage measured; under 500 steps it is skipped.
# Seen on an H200 (2026-11-28): the speed stage took 458 s (torch.compile alone 82 s); the quality stage
# with STEPS=2000 took 245 s (before it ended with the assign-against-decode steps, which take about 190 s
# for both folders; 2026-11-29: the lease stage with STEPS=3500 took 537 s). A 15-minute lease holds the
# speed and quality stages together only with STEPS given and a trimmed speed stage.
#
# The curves stage runs three tests/bench/curve.py processes at once on the one GPU, each for MINUTES of
# training (scoring not counted): CUB-100 at 128 px with c3gan-128, and the 10,000 MNIST test images at 32 px
# with slcgan-32-cpu as it is and at a wider C, G and D; each is scored against the labels every 1,000 steps.
# Needs .gpu/mnist-test.tar.gz (mnist/images/CLASS/test_*.png, as quality.py unpacks them) besides the CUB archive.
#
# Needs .gpu/cub100.tar.gz (a copy of ../shared/data/cub100.tar.gz) and, for the "before" rows, the code
# before issue 5 unpacked in .gpu/before (`git archive 9c5d4cb | tar -x -C .gpu/before`). Writes
# $OUT/session.log and $OUT/results.tgz (JSON and Markdown of every bench, the run's metrics and pictures),
# re-packed after each step so a run stopped at its time limit still returns what it finished.
# The numbers in tests/bench/RESULTS.md ("Training on one GPU") come from this script.
set -u
stage=${1:?speed, quality, all, lease or curves}
: "${OUT:?set OUT to the folder for the results}"
WORK=${WORK:-/tmp/imgcluster-gpu}
R=$WORK/results
mkdir -p "$R" "$OUT"
export PYTHONUNBUFFERED=1 IMGCLUSTER_CACHE=$WORK/cache
exec > >(tee -a "$OUT/session.log") 2>&1
t0=$(date +%s)
say() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
pack() { tar czf "$OUT/results.tgz" -C "$R" . ; }
bench=(python3 tests/bench/train_speed.py --device cuda --archive .gpu/cub100.tar.gz)

say "install"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1; then
    tail -3 "$WORK/install.log"; echo "pip install failed: running from the tree"
    ln -sfn ../presets imgcluster/presets
    export PYTHONPATH=$PWD
fi
python3 -c "import torch, imgcluster; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), imgcluster.__file__)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

if [ "$stage" = speed ] || [ "$stage" = all ]; then
    say "CUDA tests"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15
    say "speed: c3gan, 32/64/128 px, fp32 and bf16, FLOPs"
    timeout 120 "${bench[@]}" --method c3gan --sizes 32 64 128 --precision fp32 bf16 --batch-size 64 --steps 20 --warmup 5 \
        --flops --json "$R/speed-c3gan.json" --markdown >"$R/speed-c3gan.md"; pack
    say "speed: slcgan, 32/64/128 px, fp32 and bf16, FLOPs"
    timeout 150 "${bench[@]}" --method slcgan --sizes 32 64 128 --precision fp32 bf16 --batch-size 64 --steps 10 --warmup 3 \
        --flops --json "$R/speed-slcgan.json" --markdown >"$R/speed-slcgan.md"; pack
    say "speed: what channels_last and cudnn.benchmark give at 128 px bf16"
    timeout 60 "${bench[@]}" --method c3gan --sizes 128 --precision bf16 --batch-size 64 --steps 20 --warmup 5 \
        --extra contiguous cudnn-benchmark --json "$R/variants-c3gan.json" --markdown >"$R/variants-c3gan.md"
    timeout 90 "${bench[@]}" --method slcgan --sizes 128 --precision bf16 --batch-size 64 --steps 10 --warmup 3 \
        --extra contiguous cudnn-benchmark --json "$R/variants-slcgan.json" --markdown >"$R/variants-slcgan.md"; pack
    say "speed: torch.compile at 128 px bf16 (its first steps, the compilation, reported apart)"
    timeout 100 "${bench[@]}" --method c3gan --sizes 128 --precision bf16 --batch-size 64 --steps 20 --warmup 5 \
        --no-literal --extra compiled --json "$R/compiled-c3gan.json" --markdown >"$R/compiled-c3gan.md"; pack
    say "speed before issue 5 (commit 9c5d4cb: batches copied from the host each step, fp32 only, random pixels)"
    for m in c3gan slcgan; do
        steps=20; [ $m = slcgan ] && steps=10
        PYTHONPATH=.gpu/before timeout 120 python3 .gpu/before/tests/bench/train_speed.py --method $m --device cuda \
            --sizes 32 64 128 --batch-size 64 --steps $steps --warmup 3 --no-literal --markdown >"$R/before-$m.md"
        pack
    done
    cat "$R"/*.md
fi

if [ "$stage" = lease ]; then
    say "CUDA tests, beside the CUB-100 run"
    (timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$R/cuda-tests.log" 2>&1; \
     echo "== [$(( $(date +%s) - t0 )) s] CUDA tests done: $(tail -1 "$R/cuda-tests.log")") &
    tests=$!
    stage=quality
fi
if [ "$stage" = quality ] || [ "$stage" = all ]; then
    deadline=${DEADLINE_S:-560}
    if [ -z "${STEPS:-}" ]; then
        # 200 s for everything around the training: k-means, cache, selection, assign and sheets (about
        # 60 s), then the assign-against-decode steps on CUB-100 (about 100 s); CIFAR-10's get what is left
        STEPS=$(python3 -c "
import json, sys
rows = json.load(open('$R/speed-c3gan.json'))['rows']
sec = next(r['s_per_step'] for r in rows if (r['size'], r['precision'], r['variant']) == (128, 'bf16', 'imgcluster'))
budget = $deadline - $(( $(date +%s) - t0 )) - 200
print(max(0, min(150000, int(budget / (sec * 1.15)) // 100 * 100)))")
        if [ "$STEPS" -lt 500 ]; then say "CUB-100 run skipped: only $STEPS steps would fit"; stage=skip; fi
    fi
fi
if [ "$stage" = quality ] || [ "$stage" = all ]; then
    say "CUB-100 at 128 px, c3gan-128, K = 100, ${STEPS:?no step count} steps, against k-means in the same run"
    mkdir -p "$WORK/data" && tar xzf .gpu/cub100.tar.gz -C "$WORK/data"
    timeout $(( deadline - ($(date +%s) - t0) - 30 )) python3 tests/bench/quality.py --folder "$WORK/data/cub100/images" --size 128 \
        --clusters 100 --preset c3gan-128 --steps "$STEPS" --device cuda --work "$WORK/q" --out "$R/quality" --seeds 0
    run=$(ls -d "$WORK"/q/runs/cub100-c3gan-128-128-s0 2>/dev/null)
    if [ -n "$run" ]; then
        mkdir -p "$R/cub-run"
        cp "$run/config.yaml" "$run/metrics.jsonl" "$R/cub-run/" 2>/dev/null
        # not the sample grids: 64 clusters x 8 at 128 px is about 16 MB each, over the tool's file limit
        cp "$run"/sheets/cluster-00[0-3].png "$R/cub-run/" 2>/dev/null
        pack
        say "assign of the 5,902 CUB-100 files on the GPU against decoding them (best of 2)"
        timeout $(( deadline - ($(date +%s) - t0) )) python3 tests/bench/large_folder.py --run "$run" \
            --folder "$WORK/data/cub100/images" --device cuda --repeat 2 --work "$WORK/lf" >"$R/assign-cub100.md"
        cat "$R/assign-cub100.md"; pack
        if [ -f .gpu/cifar10-test.tar.gz ]; then
            say "assign of the 10,000 CIFAR-10 test JPEGs with the same model, against decoding them (best of 2)"
            tar xzf .gpu/cifar10-test.tar.gz -C "$WORK/data"
            timeout $(( deadline - ($(date +%s) - t0) )) python3 tests/bench/large_folder.py --run "$run" \
                --folder "$WORK/data/cifar10/images" --device cuda --repeat 2 --work "$WORK/lf" >"$R/assign-cifar10.md"
            cat "$R/assign-cifar10.md"; pack
        fi
    fi
    pack
fi
if [ -n "${tests:-}" ]; then
    wait "$tests"                       # (a bare wait would also wait for the tee above, forever)
    cp "$R/cuda-tests.log" "$OUT/"
    pack
fi
if [ "$stage" = curves ]; then
    minutes=${MINUTES:-7.5}
    mkdir -p "$WORK/data" && tar xzf .gpu/cub100.tar.gz -C "$WORK/data" && tar xzf .gpu/mnist-test.tar.gz -C "$WORK/data"
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 30 >"$OUT/smi.log" 2>&1 &
    smi=$!
    curve=(timeout $(( ${minutes%.*} * 60 + 150 )) python3 tests/bench/curve.py --device cuda --every 1000 --minutes "$minutes")
    say "curves: CUB-100 c3gan-128 (bf16); MNIST slcgan-32-cpu (fp32); MNIST slcgan-32-cpu, wider (fp32); side by side"
    "${curve[@]}" --folder "$WORK/data/cub100/images" --size 128 --clusters 100 --preset c3gan-128 >"$OUT/curve-cub100-c3gan-128.log" 2>&1 &
    "${curve[@]}" --folder "$WORK/data/mnist/images" --preset slcgan-32-cpu --steps 100000 --set-option precision=fp32 \
        >"$OUT/curve-mnist-slcgan-32-cpu.log" 2>&1 &
    "${curve[@]}" --folder "$WORK/data/mnist/images" --preset slcgan-32-cpu --steps 100000 --set-option precision=fp32 \
        --set-option slcgan.ch=64 --set-option slcgan.c_width=64 --set-option slcgan.z_dim=128 --set-option slcgan.embed_dim=128 \
        >"$OUT/curve-mnist-slcgan-32-cpu-wide.log" 2>&1 &
    wait %2 %3 %4
    kill $smi
    tail -n 4 "$OUT"/curve-*.log
fi
say "done"
