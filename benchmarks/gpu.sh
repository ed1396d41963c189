#!/usr/bin/env bash
# GPU benchmarks behind docs/benchmarks.md. Run from the repository root on a CUDA machine that has torch,
# transformers, peft, accelerate, pandas and click (the device image); the rest comes as wheels:
#
#   here:   ../shared/tools/gpu-wheels.sh .whl ; ../shared/tools/gpu-minilm.sh .gpu-minilm
#           # the image's tokenizers 0.23.2 drops SQuAD stride windows (hpml refuses it): carry a fixed one
#           .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_17_x86_64 -d .whl tokenizers==0.23.3
#           mkdir -p .gpu-tok && cp .gpu-minilm/{tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} .gpu-tok/
#           mkdir -p .gpu-data/sst2 && cp ../shared/data/sst2/*.tsv .gpu-data/sst2/
#   there:  bash benchmarks/gpu.sh setup            (carry .whl .gpu-tok; installs into /tmp/hpml-site)
#           bash benchmarks/gpu.sh sst2             (carry .gpu-minilm .gpu-data)
#           bash benchmarks/gpu.sh squad a1 a2 …    (random-init bert-base shapes on generated SQuAD v2;
#                                                    SQUAD_STEPS, MAX_TOKENS for p* variants, RUN_LIMIT_S;
#                                                    PYSPY=1: py-spy samples each run into $OUT/pyspy-<v>.txt.gz)
#           bash benchmarks/gpu.sh startup [variant] (start to first step: 1 run fills the caches, then
#                                                    3 pairs with and without HPML_LEAN_IMPORTS)
#           bash benchmarks/gpu.sh trainpath        (their speed as a table; REFERENCE=bench results.json)
#           bash benchmarks/gpu.sh vram             (the study's probe: A3, C1, C2, C2-8, SST-2 fp32/qlora)
#           bash benchmarks/gpu.sh qlora-load       (reload the registered QLoRA adapter on its 4-bit base)
#           bash benchmarks/gpu.sh learnability     (carry .gpu-tok .gpu-minilm .gpu-data; no setup needed)
#   here:   cp <returned mlflow.db> .gpu-bench/ ; hpml report with MLFLOW_TRACKING_URI=sqlite:///.gpu-bench/mlflow.db
# Every run lands in one SQLite store, .gpu-bench/mlflow.db in the repository (git-ignored): carry it to keep
# adding to it across machines; each stage copies it to $OUT so it comes back.
set -euo pipefail
stage="${1:?stage: setup | sst2 | squad [variants…] | startup | trainpath | vram | qlora-load | learnability}"; shift || true
BENCH_DIR="${BENCH_DIR:-/tmp/hpml-bench}"
OUT="${OUT:-$BENCH_DIR/out}"
mkdir -p "$BENCH_DIR" "$OUT"
# The device image sets PYTHONDONTWRITEBYTECODE=1: every process then compiles ~3,800 modules from source
# (~14 s before the first step). Let Python keep bytecode, outside site-packages (the image's may be read-only).
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/hpml-pyc
export PYTHONPATH="/tmp/hpml-site:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p .gpu-bench
export MLFLOW_TRACKING_URI="sqlite:///$PWD/.gpu-bench/mlflow.db" TORCHINDUCTOR_CACHE_DIR="$BENCH_DIR/inductor"
export HPML_CACHE_DIR="$BENCH_DIR/cache" HPML_TOKENIZER=/tmp/hpml-tok  # bert-base-uncased vocab (MiniLM's)
hpml() { python3 -m hpml.cli "$@"; }

case "$stage" in
setup)
  python3 -m pip install -q --no-index --no-deps --target /tmp/hpml-site .whl/*.whl
  # every later start imports from bytecode (see PYTHONPYCACHEPREFIX above): written by this first import
  python3 -c "import hpml.training, hpml.tracking, mlflow.tracking, transformers.trainer, peft; print('bytecode in', __import__('sys').pycache_prefix)"
  rm -rf /tmp/hpml-tok && cp -r .gpu-tok /tmp/hpml-tok
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, tokenizers, peft, mlflow, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'peft', peft.__version__, 'mlflow', mlflow.__version__, 'bnb', bitsandbytes.__version__)"
  ;;
sst2)
  # Study 2's setup with MiniLM: first 20k rows, 2 epochs, batch 16/32, max length 128, seed 42.
  for v in "${@:-fp32 bf16 lora qlora}"; do
    for one in $v; do
      hpml train-sst2 --variant "$one" --model .gpu-minilm --data-dir .gpu-data/sst2 --purpose real \
        || echo "FAILED sst2 $one"
    done
  done
  ;;
squad)
  # Speed and memory only: random-init bert-base, generated data, a few hundred steps at batch 32.
  [ -f "$BENCH_DIR/squad/train-v2.0.json" ] || hpml make-data squad --out "$BENCH_DIR/squad" --train 6000 --dev 600
  steps="${SQUAD_STEPS:-200}"
  for v in "${@:-a1 a2 a3 a4-nb a4-b b1 b2 b3 c1 c2-8 c2 d1}"; do
    for one in $v; do
      packed=(); case "$one" in p*) packed=(--max-tokens "${MAX_TOKENS:-6000}");; esac
      spy=(); [ -n "${PYSPY:-}" ] && spy=(/tmp/hpml-site/bin/py-spy record --nonblocking -r 200 --format raw -o "$BENCH_DIR/pyspy-$one.txt" --)
      timeout -s INT "${RUN_LIMIT_S:-300}" "${spy[@]}" python3 -m hpml.cli train-squad --variant "$one" --model random:bert-base \
        --data-dir "$BENCH_DIR/squad" --max-steps "$steps" --batch-size 32 --eval-batch-size 64 \
        --max-eval-samples 600 --register false --purpose real "${packed[@]}" || echo "FAILED squad $one"
      [ -z "${PYSPY:-}" ] || gzip -c "$BENCH_DIR/pyspy-$one.txt" > "$OUT/pyspy-$one.txt.gz"
    done
  done
  ;;
vram)
  for v in a3 c1 c2 c2-8 fp32 qlora; do
    hpml vram-probe --variant "$v" --model random:bert-base || echo "FAILED vram $v"
  done
  ;;
learnability)
  # no wheels needed (carry .gpu-tok .gpu-minilm): which small model learns the generated SQuAD v2 in a few
  # hundred steps, and how far the SST-2 real-data check moves with the seed (carry .gpu-data too)
  HPML_TOKENIZER=.gpu-tok python3 benchmarks/squad_learnability.py --model random:tiny --lr 1e-3 \
    --steps 300 1200 --train 10000 > "$OUT/learn_random_tiny.jsonl" &
  python3 benchmarks/squad_learnability.py --model .gpu-minilm --layers 2 --lr 5e-4 --steps 300 \
    --seeds 0 1 2 3 4 > "$OUT/learn_minilm_l2.jsonl" &
  python3 benchmarks/sst2_seeds.py --model .gpu-minilm --data .gpu-data/sst2 --seeds 42 1 2 3 4 \
    --recipe 1e-4,16,0,0 --recipe 2e-4,32,0.1,0 > "$OUT/sst2_seeds.jsonl" &
  wait
  cat "$OUT"/learn_*.jsonl "$OUT/sst2_seeds.jsonl"
  ;;
startup)
  # process start to first training step with cached features: one run fills the cache, then three pairs,
  # each with and without hpml's lean imports (HPML_LEAN_IMPORTS=0: scikit-learn, bitsandbytes imported)
  [ -f "$BENCH_DIR/squad/train-v2.0.json" ] || hpml make-data squad --out "$BENCH_DIR/squad" --train 6000 --dev 600
  for lean in 1 1 0 1 0 1 0; do
    HPML_LEAN_IMPORTS=$lean /usr/bin/time -f "wall %e s" python3 -m hpml.cli train-squad --variant "${1:-a2}" \
      --model random:bert-base --data-dir "$BENCH_DIR/squad" --max-steps 5 --batch-size 32 --max-eval-samples 64 \
      --register false --purpose test
  done
  python3 benchmarks/trainpath_table.py | tee "$OUT/startup.md"
  ;;
trainpath)
  # hpml's own training path as `squad` left it in the store; REFERENCE=<bench results.json> adds ratios
  python3 benchmarks/trainpath_table.py ${REFERENCE:+--reference "$REFERENCE"} | tee "$OUT/trainpath.md"
  ;;
qlora-load)
  # needs the sst2 stage's registered models (their artifacts stay under ./mlruns on that machine)
  python3 benchmarks/qlora_load.py "$@"
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
if [ -f .gpu-bench/mlflow.db ]; then cp .gpu-bench/mlflow.db "$OUT/mlflow.db"; fi
