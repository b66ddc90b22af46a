#!/usr/bin/env bash
# The whole pipeline, stages 1..7 in order; stops at the first failure and says which stage.
#
#   ./run.sh                                   the embedded demo: synthetic catalog, images served from
#                                              127.0.0.1, the tiny Qwen2.5-VL, CPU, a few minutes
#   ./run.sh --data-dir dataset --model Qwen/Qwen2.5-VL-3B-Instruct --ngpu 8
#   ./run.sh --from-stage 6 --to-stage 6       rerun one stage (finished work is skipped, training resumes)
#
# Options: --data-dir D  --work-dir W  --model M  --from-stage N  --to-stage N  --ngpu N  --demo
#          --demo-port P (default 8765)  --demo-train-rows N  --demo-test-rows N
#          --nnodes N --node-rank R --master-addr HOST [--master-port P]   stages 6-7 over N machines
#          --args-N "OPTIONS"   options passed on to stage N (1..7), e.g. --args-1 "--concurrency 128";
#          --train-args and --infer-args are --args-6 and --args-7; see each stage's --help
# PYTHON (default: python3) picks the interpreter.

set -euo pipefail
cd "$(dirname "$0")"

DATA_DIR="" WORK_DIR="work" MODEL="" FROM=1 TO=7 NGPU=1 DEMO=0 PORT=8765 TRAIN_ROWS=2000 TEST_ROWS=200
NNODES=1 NODE_RANK=0 MASTER_ADDR="" MASTER_PORT=29500
PY="${PYTHON:-python3}"
ARGS1=() ARGS2=() ARGS3=() ARGS4=() ARGS5=() ARGS6=() ARGS7=()
pass_on() {  # pass_on N "OPTIONS": word-split OPTIONS onto stage N's extra arguments
  local words; read -r -a words <<< "$2"; declare -n extra="ARGS$1"; extra+=("${words[@]}")
}
usage() { sed -n '2,/^$/p' "$0" | sed -e 's/^# \{0,1\}//' -e '/^$/d'; }
bad() { echo "run.sh: $1" >&2; usage >&2; exit 2; }
value() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || bad "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) value "$@"; DATA_DIR="$2"; shift 2 ;;
    --work-dir) value "$@"; WORK_DIR="$2"; shift 2 ;;
    --model) value "$@"; MODEL="$2"; shift 2 ;;
    --from-stage) value "$@"; FROM="$2"; shift 2 ;;
    --to-stage) value "$@"; TO="$2"; shift 2 ;;
    --ngpu) value "$@"; NGPU="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --nnodes) value "$@"; NNODES="$2"; shift 2 ;;
    --node-rank) value "$@"; NODE_RANK="$2"; shift 2 ;;
    --master-addr) value "$@"; MASTER_ADDR="$2"; shift 2 ;;
    --master-port) value "$@"; MASTER_PORT="$2"; shift 2 ;;
    --demo-port) value "$@"; PORT="$2"; shift 2 ;;
    --demo-train-rows) value "$@"; TRAIN_ROWS="$2"; shift 2 ;;
    --demo-test-rows) value "$@"; TEST_ROWS="$2"; shift 2 ;;
    --args-[1-7]) [ $# -ge 2 ] || bad "$1 needs a value"; pass_on "${1#--args-}" "$2"; shift 2 ;;
    --train-args) [ $# -ge 2 ] || bad "$1 needs a value"; pass_on 6 "$2"; shift 2 ;;
    --infer-args) [ $# -ge 2 ] || bad "$1 needs a value"; pass_on 7 "$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad "unknown option $1" ;;
  esac
done
number() { case "$2" in ''|*[!0-9]*) bad "$1 takes a whole number, not '$2'" ;; esac; }
number --from-stage "$FROM"; number --to-stage "$TO"; number --ngpu "$NGPU"; number --demo-port "$PORT"
number --demo-train-rows "$TRAIN_ROWS"; number --demo-test-rows "$TEST_ROWS"
[ "$FROM" -ge 1 ] && [ "$FROM" -le 7 ] || bad "--from-stage must be 1..7, not $FROM"
[ "$TO" -ge 1 ] && [ "$TO" -le 7 ] || bad "--to-stage must be 1..7, not $TO"
[ "$FROM" -le "$TO" ] || bad "--from-stage $FROM comes after --to-stage $TO"
[ "$NGPU" -ge 1 ] || bad "--ngpu must be at least 1"
number --nnodes "$NNODES"; number --node-rank "$NODE_RANK"; number --master-port "$MASTER_PORT"
[ "$NNODES" -ge 1 ] || bad "--nnodes must be at least 1"
[ "$NODE_RANK" -lt "$NNODES" ] || bad "--node-rank must be below --nnodes"
[ "$NNODES" -eq 1 ] || [ -n "$MASTER_ADDR" ] || bad "--nnodes $NNODES needs --master-addr (node 0's address)"
[ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || bad "--demo-port must be 1..65535, not $PORT"
[ -z "$DATA_DIR" ] && DEMO=1
# the tiny random model is the demo's; on real data it would train and predict without a word of warning
[ -n "$MODEL" ] || [ "$DEMO" = 1 ] || bad "--data-dir needs --model (e.g. Qwen/Qwen2.5-VL-3B-Instruct; tiny: the demo's random model)"
MODEL="${MODEL:-tiny}"

# each stage's passed-on options are spelled right, before hours of stages 1-5 (their inputs are checked later)
for n in 1 2 3 4 5 6 7; do
  declare -n given="ARGS$n"
  if [ "$n" -ge "$FROM" ] && [ "$n" -le "$TO" ] && [ ${#given[@]} -gt 0 ]; then
    "$PY" "$(ls "${n}"_*.py)" --check-args "${given[@]}" > /dev/null || { echo "run.sh: --args-$n: see above" >&2; exit 2; }
  fi
done

# Stage-specific settings: the demo uses small images and a short schedule so that it runs on a CPU.
DOWNLOAD=() PIXELS=() JSONL=() TRAIN=() INFER=()
if [ "$DEMO" = 1 ]; then
  DATA_DIR="$WORK_DIR/demo"
  DOWNLOAD=(--allow-private-hosts)  # its images are served from 127.0.0.1
  PIXELS=(--min-pixels 12544 --max-pixels 25088)
  JSONL=(--validation-split-ratio 0.1)
  TRAIN=(--global-batch-size 8 --epochs 12 --learning-rate 2e-3 --lora-r 32 --lora-alpha 32
         --eval-steps 500 --eval-samples 100 --save-steps 500 --workers 1)
  INFER=(--workers 1)
  if [ "$FROM" -le 1 ]; then
    if [ ! -f "$DATA_DIR/demo.json" ]; then
      "$PY" -m common.demo.catalog --out "$DATA_DIR" --base-url "http://127.0.0.1:$PORT" \
        --train-rows "$TRAIN_ROWS" --test-rows "$TEST_ROWS"
    fi
    "$PY" -m common.demo.imageserver --root "$DATA_DIR/images" --port "$PORT" > "$WORK_DIR/imageserver.log" 2>&1 &
    SERVER_PID=$!
    trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
      grep -q serving "$WORK_DIR/imageserver.log" 2>/dev/null && break
      kill -0 $SERVER_PID 2>/dev/null || { echo "run.sh: the demo image server did not start (port $PORT busy? use --demo-port):" >&2; cat "$WORK_DIR/imageserver.log" >&2; exit 1; }
      sleep 0.2
    done
  fi
fi
mkdir -p "$WORK_DIR"

stage() {  # stage N description command...
  local n="$1" what="$2"; shift 2
  [ "$n" -lt "$FROM" ] || [ "$n" -gt "$TO" ] && return 0
  echo "== stage $n: $what"
  local started=$SECONDS
  if ! "$@"; then
    echo "run.sh: stage $n ($what) failed; fix the error above and rerun with --from-stage $n" >&2
    exit 1
  fi
  echo "== stage $n done in $((SECONDS - started)) s"
}
launch() {  # run a stage script, under torchrun when more than one GPU or machine is asked for
  if [ "$NNODES" -gt 1 ]; then
    "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
      --master_port "$MASTER_PORT" --nproc_per_node "$NGPU" "$@"
  elif [ "$NGPU" -gt 1 ]; then "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "$@"
  else "$PY" "$@"; fi
}

stage 1 "download images" "$PY" 1_download.py --data-dir "$DATA_DIR" --work-dir "$WORK_DIR" "${DOWNLOAD[@]}" "${ARGS1[@]}"
stage 2 "resize images" "$PY" 2_resize.py --work-dir "$WORK_DIR" "${PIXELS[@]}" "${ARGS2[@]}"
stage 3 "chat JSONL" "$PY" 3_create_jsonl.py --data-dir "$DATA_DIR" --work-dir "$WORK_DIR" "${JSONL[@]}" "${ARGS3[@]}"
stage 4 "encode samples" "$PY" 4_preprocess.py --work-dir "$WORK_DIR" --model "$MODEL" "${PIXELS[@]}" "${ARGS4[@]}"
stage 5 "pack shards" "$PY" 5_convert.py --work-dir "$WORK_DIR" "${ARGS5[@]}"
stage 6 "train" launch 6_train.py --work-dir "$WORK_DIR" --model "$MODEL" "${TRAIN[@]}" "${ARGS6[@]}"
stage 7 "predict validation (report)" launch 7_infer.py --work-dir "$WORK_DIR" --data-dir "$DATA_DIR" --split validation \
  "${INFER[@]}" "${ARGS7[@]}"
stage 7 "predict test" launch 7_infer.py --work-dir "$WORK_DIR" --data-dir "$DATA_DIR" "${INFER[@]}" "${ARGS7[@]}"
if [ "$TO" -eq 7 ]; then "$PY" -m common.summary --work-dir "$WORK_DIR" --data-dir "$DATA_DIR"; fi
