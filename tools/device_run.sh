#!/usr/bin/env bash
# One prepared run of the whole book on a GPU machine (README, "Running on a GPU"):
#   1. every chapter (but the appendix that plots these results) executed as plain Python on the
#      GPU (tools/run_chapters.py), $JOBS at once;
#   2. the benchmarks (python -m bnlib.lab.bench) on the GPU, in float32 and in bfloat16;
#   3. Ioffe & Szegedy's Figure 1 at full scale with bnlib's BN (bench section figure1), timed;
# results written to $OUT (default results/device): chapters.json, bench.json, bench-bf16.json,
# bench-figure1.json and three logs (machine.log, chapters.log, bench.log).
#
# On any machine with a CUDA GPU:
#   1. a copy of the repository, and Python with torch, numpy, matplotlib and tqdm (`pip install -r
#      requirements.txt` or `pip install -e .`);
#   2. MNIST: the machine downloads it on first use; a machine without network needs the four files
#      (raw or .gz) in ./data (or $BNLIB_DATA): `make device-data` on a machine with network puts them there;
#   3. bash tools/device_run.sh [chapter timeout in s, default 420]
#      (environment: JOBS chapters at once, default 6; BUDGET seconds for the whole run, default 570, of
#      which the later steps get what the chapters left; OUT, PYTHON);
#   4. copy the JSON files from $OUT into bnlib/lab/results/<machine>/, where the appendix finds them.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/device}
TIMEOUT=${1:-420}
JOBS=${JOBS:-6}  # chapters run at once (one per two or three CPU cores)
BUDGET=${BUDGET:-570}  # seconds for the whole script
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONHASHSEED=0
export BNLIB_DATA=${BNLIB_DATA:-$PWD/data}
unset BNLIB_PROGRESS
SECONDS=0
{
  echo "== machine"; date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  echo "== data"; $PY -m bnlib.lab.data --root "$BNLIB_DATA"
} 2>&1 | tee "$OUT/machine.log"
status=0
echo "== chapters (timeout ${TIMEOUT}s each)"
# Every chapter but the appendix chapters/speed_memory.ipynb, which plots the records this script makes.
CHAPTERS=$(ls chapters/*.ipynb | grep -v '/speed_memory\.ipynb$')
$PY tools/run_chapters.py --jobs "$JOBS" --timeout "$TIMEOUT" --json "$OUT/chapters.json" $CHAPTERS 2>&1 \
  | tee "$OUT/chapters.log" | grep --line-buffered -E '^(ok|FAILED|[0-9]+ of)' || status=1
# Later steps get what is left of BUDGET seconds.
left() { echo $(( BUDGET - SECONDS > 10 ? BUDGET - SECONDS : 10 )); }
echo "== benchmarks, float32 ($SECONDS s so far)"
timeout "$(left)" $PY -m bnlib.lab.bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1
echo "== benchmarks, bfloat16 ($SECONDS s so far)"
timeout "$(left)" $PY -m bnlib.lab.bench --dtype bfloat16 --sections batchnorm,bandwidth --json "$OUT/bench-bf16.json" \
  2>&1 | tee -a "$OUT/bench.log" || status=1
echo "== Figure 1 at full scale, bnlib BN ($SECONDS s so far)"
timeout "$(left)" $PY -m bnlib.lab.bench --sections figure1 --json "$OUT/bench-figure1.json" 2>&1 \
  | tee -a "$OUT/bench.log" || status=1
echo "== done in $SECONDS s, status $status"
exit $status
