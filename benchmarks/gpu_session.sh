#!/usr/bin/env bash
# Issue 17 on a lent GPU in one command: check the machine, install the carried wheels, prove the kernels and
# the compiled model correct on CUDA, then measure every benchmark of the issue's targets; full outputs under
# $OUT, a short table printed last.
#
# THE CALL (device tool `run`, from a session whose task has device time; one shot of ~10 of its 15 minutes):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Before it, on the CPU machine (no device time):
#   bash benchmarks/gpu_session.sh --wheels    # fills .whl/ (git-ignored): what the GPU image lacks, < 64 MiB
#   bash benchmarks/gpu_session.sh --dry-run   # every step below at tiny sizes on this CPU, OUT=/tmp/ldot-gpu-dry
# After it: the reply's files (under files_at) hold session.log, summary.md, RESULTS.md (benchmarks/RESULTS.md
# with this run's sections appended: copy those into the repository's, with the commit and device), train.jsonl,
# traces.tar (a torch.profiler trace of one step of each engine, gzipped Chrome JSON) and logs.tar.
#
# The image (/work/.library/device/KINDS.md) has torch 2.11 (cu130), triton 3.6, transformers 5.17, numpy,
# psutil, msgpack, pytest, ninja and nvcc, but not deepspeed (+ hjson, pydantic), webdataset (+ braceexpand),
# mlflow or FAISS. The wheels in .whl/ go to a --target directory on PYTHONPATH, so the image's CUDA torch is
# the one used; ldot itself is a tree of links to this checkout there (the repository's folders under the
# ldot namespace, as pyproject.toml maps them); `python -P -m` keeps the checkout's own ldot/ folder (the
# current directory) from shadowing it. No FAISS travels (faiss-gpu is far over the size limit): the Table 7 search is torch
# matmul + top-k on the GPU, the same exact brute force as faiss-gpu's flat index.
#
# The stages run against a deadline (LDOT_BUDGET_S, default 555 s, inside the call's 600): each is skipped
# when too little time is left for it, and every stage's outcome is in the summary. Order: environment,
# install; correctness (loss --check-only as an assertion; the Triton kernel tests and compiled == eager on
# CUDA, in parallel with DeepSpeed's FusedAdam build); train at 128 pairs (the paper's ~150: ddp/ZeRO-1/2
# eager and compiled, ZeRO-3, the real loader, profiler traces, syncs per step), train at 1,024 pairs, the
# loss at d = 256/768 and n = 16k/64k, retrieval in the Table 7 setting.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=gpu
case "${1:-}" in
  --wheels) MODE=wheels ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: $0 [--wheels | --dry-run]" >&2; exit 2 ;;
esac

# ------------------------------------------------------------------------------------------- --wheels
# Versions: what constraints.txt pins here (deepspeed as the earlier GPU runs carried it), for Python 3.12.
WHEELS="hjson==3.1.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5
typing_extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7"
if [[ $MODE == wheels ]]; then
  PY=${LDOT_PYTHON:-$ROOT/.venv/bin/python}
  mkdir -p .whl
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS || exit 1
  # DeepSpeed is published as a source archive only: built here into a pure-Python wheel (its CUDA ops are
  # compiled on first use on the GPU machine).
  ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 ||
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 || exit 1
  du -ch .whl/*.whl | tail -1
  total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
  tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  echo "wheels $((total / 1024)) KiB + tracked tree $((tree / 1024)) KiB of the 64 MiB a call may carry"
  (( total + tree < 60 * 1024 * 1024 )) || { echo "too large to carry" >&2; exit 1; }
  exit 0
fi

# ------------------------------------------------------------------------------------------- set-up
if [[ $MODE == dry ]]; then
  OUT=${OUT:-/tmp/ldot-gpu-dry}
  PY=${LDOT_PYTHON:-$ROOT/.venv/bin/python}
else
  OUT=${OUT:?OUT is set by the device tool; give OUT=DIR to run elsewhere}
  PY=${LDOT_PYTHON:-python3}
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ldot-gpu.XXXXXX)   # everything but the few files that come back
LOG=$OUT/session.log
exec > >(tee -a "$LOG") 2>&1
BUDGET=${LDOT_BUDGET_S:-555}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
printf 'stage\tstatus\tseconds\n' > "$WORK/stages.tsv"

# stage NAME MIN_S MAX_S CMD...: run CMD with at most MAX_S (and what is left) if MIN_S are left
stage() {
  local name=$1 min=$2 max=$3; shift 3
  local l; l=$(left)
  if (( l < min )); then
    echo "=== $name: skipped ($l s left, needs $min)"; printf '%s\tskipped\t0\n' "$name" >> "$WORK/stages.tsv"; return 0
  fi
  local t0=$SECONDS lim=$(( max < l ? max : l ))
  echo "=== $name (limit ${lim} s, $l s left): $*"
  timeout --kill-after=10 "$lim" bash -c '"$@"' _ "$@"  # bash -c: CMD may be one of this script's functions
  local rc=$?
  local status=ok
  (( rc == 124 || rc == 137 )) && status="timed out"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="FAILED (exit $rc)"
  echo "=== $name: $status in $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$WORK/stages.tsv"
  return 0
}

# LDOT_STAGES="environment correctness train loss retrieval" (the default: all) picks stages, for a second,
# shorter call; install always runs
STAGES=" ${LDOT_STAGES:-environment correctness train loss retrieval} "
want() { [[ $STAGES == *" $1 "* ]]; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
cp benchmarks/RESULTS.md "$WORK/RESULTS.before.md"
export LDOT_RESULTS=$OUT/RESULTS.md

if git rev-parse --git-dir >/dev/null 2>&1; then
  COMMIT="commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!benchmarks/RESULTS.md' || echo ' + uncommitted changes')"
else
  COMMIT="no .git here: note the commit the call was made from"
fi
echo "ldot GPU session: mode $MODE, $COMMIT, $(date -u '+%F %T UTC')"

# ------------------------------------------------------------------------------------------- install
SITE=$WORK/site
export PY ROOT SITE WORK MODE
install_site() {
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  if (( ${#wheels[@]} )) && [[ $MODE == dry ]]; then
    # here the wheels (for the GPU image's Python 3.12) are installed aside, to prove they install; the
    # checkout's own venv provides the packages
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --target "$WORK/wheels-check" \
      "${wheels[@]}" || return 1
    echo "the carried wheels install for CPython 3.12: $(ls "$WORK/wheels-check" | grep -c dist-info) packages"
  elif (( ${#wheels[@]} )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || return 1
  else
    echo "no wheels in .whl/ (run --wheels here first; carry=[\".whl\"] there)"; mkdir -p "$SITE"
  fi
  # the ldot namespace over this checkout's folders (pyproject.toml's package-dir), as links
  mkdir -p "$SITE/ldot"
  for f in "$ROOT"/ldot/*.py; do ln -sfn "$f" "$SITE/ldot/"; done
  for d in data kernels model tracking train eval slurm; do ln -sfn "$ROOT/$d" "$SITE/ldot/$d"; done
}
export -f install_site
stage install 30 120 install_site
export PYTHONPATH=$SITE

if [[ $MODE == gpu ]]; then
  # DeepSpeed's op builder fails to parse the image's TORCH_CUDA_ARCH_LIST=9.0a (benchmarks/RESULTS.md, train)
  export TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
  export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
fi

env_check() {
  "$PY" -P - <<'EOF'
import importlib, os, shutil, subprocess, sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "| device:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"  {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}")
missing = []
for name in ("triton", "transformers", "numpy", "psutil", "msgpack", "yaml", "PIL", "deepspeed", "webdataset",
             "pydantic", "hjson", "pytest", "faiss", "mlflow"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}  {os.path.dirname(m.__file__)}")
    except Exception as exc:
        print(f"  {name}: not importable ({type(exc).__name__})")
        if name not in ("faiss", "mlflow"):
            missing.append(name)
print("nvcc:", (subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines() or ["-"])[-1]
      if shutil.which("nvcc") else "not found", "| ninja:", shutil.which("ninja") or "not found",
      "| TORCH_CUDA_ARCH_LIST:", os.environ.get("TORCH_CUDA_ARCH_LIST"))
import ldot.model, ldot.train.engine, ldot.data.loader  # the namespace and what the benchmarks import
print("ldot from", os.path.dirname(os.path.dirname(ldot.model.__file__)))
from transformers import BertConfig, BertModel
from ldot.model import ImageEncoder
cfg = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=1)
print("transformers' own attention choice: BertModel", BertModel(BertConfig(vocab_size=100, **cfg)).config._attn_implementation,
      "| ImageEncoder", ImageEncoder(BertConfig(vocab_size=1, feature_dim=8, **cfg)).config._attn_implementation)
if missing:
    sys.exit(f"missing: {', '.join(missing)}")
EOF
}
export -f env_check
want environment && stage environment 20 60 env_check

# ------------------------------------------------------------------------------------------- correctness
if [[ $MODE == gpu ]]; then
  KERNEL_TESTS=(tests/kernels/test_contrastive_triton.py)
  COMPILE_SELECT=cuda
  LOSS_CHECK=(--check-only)
else
  KERNEL_TESTS=(tests/kernels/test_contrastive.py)
  COMPILE_SELECT="cpu and plain"
  LOSS_CHECK=(--check-only --device cpu)
fi
fused_adam() {
  "$PY" - <<'EOF'
import time, torch
t = time.time()
from deepspeed.ops.adam import FusedAdam
p = torch.nn.Parameter(torch.zeros(8, device="cuda"))
p.grad = torch.ones_like(p)
FusedAdam([p], adam_w_mode=True).step()
torch.cuda.synchronize()
print(f"DeepSpeed FusedAdam built and ran in {time.time() - t:.0f} s")
EOF
}
# in the background, each into its own log: DeepSpeed's FusedAdam build (nvcc; the ZeRO runs need it), the
# Triton kernels against the float64 reference, compiled == eager on the device
bg() {  # bg NAME MAX_S CMD...: like stage, in the background (at most what is left)
  local name=$1 max=$2; shift 2
  local l; l=$(left)
  (( l < 30 )) && { echo "skipped: $l s left" > "$WORK/$name.log"; echo "skipped 0" > "$WORK/$name.rc"; return; }
  (( max > l )) && max=$l
  # bash -c: CMD may be one of this script's functions (a bare `timeout fused_adam` exits 127)
  ( t0=$SECONDS; timeout --kill-after=10 "$max" bash -c '"$@"' _ "$@" > "$WORK/$name.log" 2>&1; rc=$?
    echo "$rc $((SECONDS - t0))" > "$WORK/$name.rc" ) &
}
export -f fused_adam
BG=()
[[ $MODE == gpu ]] && want train && { bg fused_adam 240 fused_adam; BG+=(fused_adam); }
if want correctness; then
  bg pytest_kernels 150 "$PY" -P -m pytest -q -p no:cacheprovider -x "${KERNEL_TESTS[@]}"
  bg pytest_compile 240 "$PY" -P -m pytest -q -p no:cacheprovider -rA tests/model/test_compile.py -k "$COMPILE_SELECT"
  BG+=(pytest_kernels pytest_compile)
  stage loss_check 30 120 "$PY" benchmarks/loss.py "${LOSS_CHECK[@]}"
  stage attention_tests 20 90 "$PY" -P -m pytest -q -p no:cacheprovider tests/model/test_attention.py
fi
wait_bg() {
  local name rc secs status
  for name in "$@"; do
    while [[ ! -f $WORK/$name.rc ]] && (( $(left) > 5 )); do sleep 2; done
    if [[ -f $WORK/$name.rc ]]; then
      read -r rc secs < "$WORK/$name.rc"
      if [[ $rc == skipped ]]; then status=skipped
      else status=ok; (( rc == 124 || rc == 137 )) && status="timed out"; (( rc && rc != 124 && rc != 137 )) && status="FAILED (exit $rc)"
      fi
    else
      status="still running at the deadline"; secs=-
    fi
    echo "=== $name: $status ($secs s)"; tail -n 15 "$WORK/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >> "$WORK/stages.tsv"
  done
}
(( ${#BG[@]} )) && wait_bg "${BG[@]}"

# ------------------------------------------------------------------------------------------- benchmarks
mkdir -p "$WORK/traces"
PROFILE=(--profile-dir "$WORK/traces" --profile-runs)   # completed with the 128-pair runs below
if [[ $MODE == gpu ]]; then
  TRAIN=(--size paper --precision bf16 --nproc 1 --steps 8 --warmup 2)
  RUNS128=(ddp@128 ddp+compile@128 zero1@128 zero1+compile@128 zero2@128 zero2+compile@128 zero3@128
           zero1+compile+loader@128)
  RUNS1024=(ddp+compile@1024 zero1+compile@1024 zero2+compile@1024 ddp@1024)
  LOSS=(--n 16384 65536 --d 256 768 --rep 100 --backward split slab tile)
  RETRIEVAL=(--table7-only)
else
  TRAIN=(--size tiny --precision fp32 --nproc 1 --steps 2 --warmup 1 --workers 1)
  RUNS128=(ddp@8 ddp+compile@8 zero1@8 zero3@8 zero1+compile+loader@8)
  RUNS1024=(ddp@32 zero2@32)
  LOSS=(--device cpu --n 256 --d 32 --rep 1)
  RETRIEVAL=(--table7-only --table7-pools 1000 5000 --table7-batch 8 --table7-repeats 1)
fi
PROFILE+=("${RUNS128[@]}")
# LDOT_TRAIN_RUNS="RUN ..." measures only those runs (a second, shorter call), without profiles
if [[ -n ${LDOT_TRAIN_RUNS:-} ]]; then read -ra RUNS128 <<< "$LDOT_TRAIN_RUNS"; RUNS1024=(); PROFILE=(); fi
# each run in its own process (benchmarks/train.py: memory a run leaves behind would crowd the next)
want train && stage train 100 340 "$PY" benchmarks/train.py "${TRAIN[@]}" --runs "${RUNS128[@]}" "${RUNS1024[@]}" \
  "${PROFILE[@]}" --json "$WORK/train.jsonl" --data-dir "$WORK"
want loss && stage loss 40 120 "$PY" benchmarks/loss.py "${LOSS[@]}"
want retrieval && stage retrieval 25 75 "$PY" benchmarks/retrieval.py "${RETRIEVAL[@]}"

# ------------------------------------------------------------------------------------------- what comes back
# at most 8 files, 16 MiB each: session.log, summary.md, RESULTS.md, train.jsonl, traces.tar, logs.tar
cp "$WORK/train.jsonl" "$OUT/train.jsonl" 2>/dev/null
( cd "$WORK/traces" && ls ./*.gz >/dev/null 2>&1 && tar -cf "$OUT/traces.tar" ./*.gz )
while [[ -f $OUT/traces.tar ]] && (( $(stat -c %s "$OUT/traces.tar") > 15 * 1024 * 1024 )); do
  big=$(ls -S "$WORK"/traces/*.gz | head -1); echo "dropping $big (traces.tar over 15 MiB)"; rm "$big"
  ( cd "$WORK/traces" && tar -cf "$OUT/traces.tar" ./*.gz )
done
( cd "$WORK" && tar -cf "$OUT/logs.tar" ./*.log stages.tsv 2>/dev/null )

"$PY" - "$WORK/stages.tsv" "$OUT/RESULTS.md" "$WORK/RESULTS.before.md" "$OUT/summary.md" "$OUT/train.jsonl" <<'EOF'
import difflib, json, os, sys
stages, results, before, out, train = sys.argv[1:6]
rows = [line.split("\t") for line in open(stages).read().splitlines()[1:]]
lines = ["## ldot GPU session", "", "| stage | status | s |", "| --- | --- | --- |"]
lines += [f"| {name} | {status} | {secs} |" for name, status, secs in rows]
if os.path.exists(train):
    lines += ["", "train (train.jsonl): run | samples/s | first step s | syncs/step | dynamo frames / graph breaks", ""]
    for r in map(json.loads, open(train).read().splitlines()):
        lines.append(f"- {r['name']}: " + (f"failed: {r['error'][:100]}" if "error" in r else
                     f"{r['samples_per_s']:.1f} | {r['first_step_s']:.1f} | {r.get('syncs')} | "
                     f"{r.get('dynamo_frames')} / {r.get('graph_breaks')}"))
new = [l[2:] for l in difflib.ndiff(open(before).read().splitlines(), open(results).read().splitlines())
       if l.startswith("+ ")]
keep = [l for l in new if l.startswith(("### ", "| ", "bf16 peak", "The paper's Table 7", "- syncs", "- +loader"))]
lines += ["", "New in RESULTS.md (full text in RESULTS.md, logs in session.log / logs.tar):", ""] + keep
open(out, "w").write("\n".join(lines) + "\n")
print("\n" + "\n".join(lines))
EOF
echo "total $((SECONDS - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
jobs -p | xargs -r kill 2>/dev/null  # a background check still running at the deadline
rm -rf "$WORK"
