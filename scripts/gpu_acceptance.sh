#!/usr/bin/env bash
# Everything a GPU must show, in four parts, each one device call (at most 600 s) of its own; a session
# with 15 minutes of device time runs one (the machine's start takes the rest). Timeouts come from the
# first H200 run (2026-11-29): preflight 24 s, ops build 20 s, env 7 s, GPU tests 87 s, DeepSpeed's CPU Adam
# build 53 s, the roofline child and megastream:full on qwen2.5-3b 66 s together; DeepSpeed and FSDP2 were
# still initialising at 69 s and 45 s, and qwen2.5-14b was profiling at 125 s.
#
#   part 1 (<= 545 s, the headline)
#     setup      install the carried wheels (.whl/, from scripts/gpu_wheels.sh) into --site, on PYTHONPATH
#     ds-build   DeepSpeed's CPU Adam JIT-build (53 s on the H200 machine: two -O3 -g translation units),
#                once, in the background under the next steps, joined (ds-join) before any timed row
#     preflight  print and check: Python (the carried wheels' tag must match it), g++ and ninja (megastream's
#                ops and DeepSpeed's CPU Adam JIT-build), CUDA_HOME / nvcc and the CUDA libraries, the GPU,
#                host RAM and the locked-memory limit, every import (torch, transformers, peft, accelerate,
#                deepspeed from --site, megastream from this checkout)
#     build      megastream's C++ ops, once, before any timed row
#     env        megastream env
#     ds-join    wait for ds-build
#     h2h-3b     benchmarks/throughput.py on qwen2.5-3b: megastream full (the headline) and lean, FSDP2
#                offload, DeepSpeed ZeRO-3 offload, each row under its own timeout; its JSON is rewritten
#                after every row, so a run stopped early keeps the rows it finished
#   part 2 (<= 525 s)
#     setup2     megastream's ops (a cache hit when part 1 ran on this machine) and the GPU's state
#     cpu-ops    the host CPU (an AVX-512 Xeon): tests/test_ops.py on each instruction-set path it runs and
#                benchmarks/optimizer.py on its widest path and forced to AVX2 -> OUT/optimizer-host*.json
#     pytest-gpu pytest -m gpu (the GPU tests, but for parts 3 and 4's)
#     14b        qwen2.5-14b, compact mode, 24 GB GPU cap, 3 timed steps, then a torch.profiler trace of 2
#                steps: compute-stream busy fraction, H2D/D2H time hidden under compute (the timed steps'
#                result is kept if the profile runs out of time); part 1's rates when it ran on this machine
#     7b         qwen2.5-7b megastream rows that the host's RAM holds (rates reused from the 14b step)
#   part 3 (<= 545 s) the step features before/after, and 14B at 32k tokens a step
#     setup3     megastream's ops (a cache hit after part 1 or 2 on this machine) and the GPU's state
#     pytest-features  pytest -m gpu of varlen attention, the embedding on the device and FlexAttention's
#                gradients
#     features   qwen2.5-3b, 8192-token rows of 8 documents each (seeded boundaries), 1 x 2 rows a step:
#                megastream:full, +flex (FlexAttention block-sparse document mask), +varlen (flash attention
#                over each document), +clip-previous (update each unit as its gradient lands, clipped by the
#                previous step's norm), each row under its own timeout;
#                OUT/step-features.json with each variant's tokens/s over megastream:full's and what stayed
#                unmeasured. qwen2.5-3b, not 7b: megastream:full on 7b needs ~125 GB of host RAM (its memory
#                model), over 95% of the machine's 128 GB, so its rows would be not-run (part 2 runs 7b in
#                lean mode only)
#     14b-32k    qwen2.5-14b compact + clip-previous (no gradient staging), 32k tokens a step, activations on
#                the host, 24 GB cap: issue 13's MFU >= 40% target -> OUT/qwen2.5-14b-32k-clip-previous.json
#   part 4 (<= 510 s) the rest of the step features, and LoRA on the GPU
#     setup4     as setup3
#     pytest-lora  pytest -m gpu of LoRA / QLoRA (tests/test_lora_gpu.py, tests/test_quant.py)
#     features2  the same shape: megastream:full, +varlen+clip-previous, +embed-host (the embedding gathered
#                and its gradient summed on the host: the path before engine.embedding's device default),
#                +compile (torch.compile of the layer function, 2 warm-up steps for its compilation)
#                -> OUT/step-features-2.json
#     lora       benchmarks/lora_step.py: full fine-tuning vs LoRA (rank 16, all seven projections) steps of
#                qwen2.5-1.5b, 8k tokens -> OUT/lora-step-qwen2.5-1.5b.json
#     qlora-72b  benchmarks/lora_step.py: QLoRA over an NF4 base at Qwen2.5-72B's widths (2 layers), 4k
#                tokens, 24 GB cap: tokens/s, GPU peak against the plan's, init (quantizing) time
#                -> OUT/qlora-qwen2.5-72b-2-layers.json
#
#   bash scripts/gpu_acceptance.sh [--part 1|2|3|4|all] [--out DIR] [--dry-run] [--site DIR] [--wheels DIR]
#                                  [--deadline SECONDS]
#
# --deadline S: a step whose timeout would end more than S seconds after the run started is skipped
# (status skipped), so a run given one device call (at most 600 s) ends inside it and packs its logs:
# `--part all --deadline 560` runs part 2's steps as far as the time part 1 left allows.
#
# Every step runs under its own `timeout` (the whole process group is killed at its limit) and a failing
# step never stops the later ones. Each step's output goes to OUT/steps/<step>.log (and the harness's
# per-row logs to OUT/steps/<step>/), each part prints every step's elapsed time as it ends and a summary
# table last; OUT/summary.txt and OUT/acceptance.json (plan + results per part) sum it up, the
# head-to-head JSONs are OUT/h2h-<model>.json (part 3's: OUT/step-features.json), and
# OUT/logs-part<N>.tar.gz holds OUT/steps. OUT is --out, else $OUT (the device machine's folder: there
# OUT/steps is removed once packed, since at most 8 files come back), else runs/acceptance-<date>.
#
# --dry-run prints the plan (every step, its timeout, its command) and runs what a CPU can with tiny
# shapes: the preflight (GPU checks reported, not required), the ops build, megastream env, pytest -m gpu
# (collecting and skipping), throughput.py --dry-run (the CPU, a tiny model, the head-to-head's rows, both
# bounds) and throughput.py --check of every GPU command (its arguments, rows, timeouts, what the host's
# RAM allows); parts 3 and 4 check their GPU commands (throughput.py --check, lora_step.py --check: the
# rows, their settings and timeouts, the plan's GPU peaks) and collect their GPU tests: variant rows and
# packed rows run on the CPU in tests/test_throughput_harness.py, lora_step.py in tests/test_lora_plan.py.
# tests/test_gpu_acceptance.py runs it.
set -o pipefail  # no -e: a failing step never stops the next; no -u: nor does an empty list

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PART=all
DRY=0
OUT_DIR=""
SITE=/tmp/megastream-site
WHL="$REPO/.whl"
PY=${PYTHON:-python3}
DEADLINE=""  # --deadline S: skip any step whose timeout would end more than S s after the run started
BUDGET_1=545
BUDGET_2=525
BUDGET_3=545
BUDGET_4=510
DRY_SCALE=${DRY_SCALE:-4}  # a dry run on a small CPU gets this many times each step's (GPU-sized) timeout
HOST_RAM_GB=128  # the device machine's RAM (KINDS.md); its MemTotal starts lower and grows with use

usage() { sed -n '2,/^set -o pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --part) PART=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --site) SITE=$2; shift 2 ;;
    --wheels) WHL=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "gpu_acceptance.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
case "$PART" in 1|2|3|4|all) ;; *) echo "--part must be 1, 2, 3, 4 or all (parts 1 and 2)" >&2; exit 2 ;; esac
if [ -n "$DEADLINE" ] && ! [[ $DEADLINE =~ ^[0-9]+$ ]]; then echo "--deadline must be a whole number of seconds, got $DEADLINE" >&2; exit 2; fi
PACK=0
if [ -z "$OUT_DIR" ]; then
  if [ -n "${OUT:-}" ]; then OUT_DIR=$OUT; PACK=1; else OUT_DIR="$REPO/runs/acceptance-$(date +%F-%H%M%S)"; fi
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
STEPS="$OUT_DIR/steps"
mkdir -p "$STEPS"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PY REPO SITE WHL STEPS OUT_DIR DRY
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
TP="$PY $REPO/benchmarks/throughput.py"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ---- the steps' programs ----------------------------------------------------------------------------
cat > "$STEPS/preflight.py" <<'EOF'
"""Print and check what the runs need. A failed requirement makes the step fail (after every check has
printed); on a dry run the GPU's requirements are reported, not required."""
import ctypes.util, glob, importlib, importlib.util, os, re, resource, shutil, subprocess, sys
from pathlib import Path

dry = os.environ.get("DRY") == "1"
failed = []


def report(ok, what, detail, gpu=False):
    word = "ok  " if ok else ("skip" if dry and gpu else "FAIL")
    print(f"  {word}  {what:<26} {detail}", flush=True)
    if not ok and not (dry and gpu):
        failed.append(what)


def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({e})"


# Python vs the carried wheels (cpXY tags must match this interpreter)
v = f"{sys.version_info.major}{sys.version_info.minor}"
wheels = sorted(Path(os.environ["WHL"]).glob("*.whl"))
tags = sorted({m.group(1) for w in wheels for m in [re.search(r"-cp(\d+)-", w.name)] if m})
report(all(t == v for t in tags), "python vs carried wheels",
       f"python {sys.version.split()[0]} ({sys.executable}); {len(wheels)} wheels in {os.environ['WHL']}"
       + (f", tagged cp{', cp'.join(tags)}" if tags else ""), gpu=True)
# compilers (megastream's ops and DeepSpeed's CPU Adam are JIT-built with them)
gxx = shutil.which("g++") or shutil.which("c++")
report(bool(gxx), "g++", (run(gxx, "--version").splitlines() or ["?"])[0] if gxx else "not found")
ninja = shutil.which("ninja")
report(bool(ninja), "ninja", f"{run(ninja, '--version')} ({ninja})" if ninja else "not found")

import torch

report(True, "torch", f"{torch.__version__}, CUDA build {torch.version.cuda}, {torch.__file__}")
cuda = torch.cuda.is_available()
report(cuda, "CUDA device", f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} GB, "
       f"capability {torch.cuda.get_device_capability(0)}" if cuda else "torch.cuda.is_available() is False", gpu=True)
from torch.utils.cpp_extension import CUDA_HOME

nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
nv = run(nvcc, "--version") if nvcc and os.path.exists(nvcc) else ""
nv_ver = (re.findall(r"release (\d+\.\d+)", nv) or ["none"])[0]
report(bool(CUDA_HOME) and nv_ver != "none", "CUDA_HOME / nvcc",
       f"CUDA_HOME={CUDA_HOME}, nvcc {nv_ver} (torch built with {torch.version.cuda}; DeepSpeed's CUDA ops need the "
       "same major)", gpu=True)
if torch.version.cuda and nv_ver != "none":
    report(nv_ver.split(".")[0] == torch.version.cuda.split(".")[0], "nvcc vs torch CUDA major",
           f"{nv_ver} vs {torch.version.cuda}", gpu=True)
# CUDA libraries: DeepSpeed 0.19's CPU Adam is a C++-only extension (links libtorch, no CUDA library);
# its CUDA ops would link cudart, cublas and curand (none is built here). Where each one is:
libdirs = [os.path.join(CUDA_HOME, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")] if CUDA_HOME else []
libdirs += glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib"))
for lib in ("cudart", "cublas", "curand"):
    hits = [p for d in libdirs for p in glob.glob(os.path.join(d, f"lib{lib}.so*"))]
    found = hits[0] if hits else ctypes.util.find_library(lib)
    report(bool(found), f"lib{lib}", found or "not found (only DeepSpeed's CUDA ops, not used here, link it)", gpu=True)
torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
report(all(os.path.exists(os.path.join(torch_lib, f"lib{n}.so")) for n in ("c10", "torch", "torch_cpu", "torch_python")),
       "libtorch (extensions link)", torch_lib)
# the host
mem = {l.split(":")[0]: l.split()[1] for l in open("/proc/meminfo") if ":" in l}
soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
report(True, "host", f"{os.cpu_count()} cores, MemTotal {int(mem['MemTotal']) / 1e6:.0f} GB, MemAvailable "
       f"{int(mem['MemAvailable']) / 1e6:.0f} GB, memlock {'unlimited' if soft == resource.RLIM_INFINITY else soft}")
report(True, "disk", f"{shutil.disk_usage('/tmp').free / 1e9:.0f} GB free in /tmp")
# every import (a dry run only looks up the GPU-only ones: importing peft alone takes ~7 s of a CPU)
for mod, gpu in (("transformers", False), ("peft", True), ("accelerate", True), ("deepspeed", True), ("pydantic", True),
                 ("megastream", False)):
    if dry and gpu:
        spec = importlib.util.find_spec(mod)
        report(spec is not None, f"find {mod}", spec.origin if spec else "not installed here", gpu=True)
        continue
    try:
        m = importlib.import_module(mod)
        report(True, f"import {mod}", f"{getattr(m, '__version__', '?')} ({os.path.dirname(m.__file__)})")
    except Exception as e:
        report(False, f"import {mod}", f"{type(e).__name__}: {e}", gpu=gpu)
print(f"preflight: {'FAILED: ' + ', '.join(failed) if failed else 'every requirement met'}"
      + (" (dry run: GPU requirements reported, not required)" if dry else ""))
sys.exit(1 if failed else 0)
EOF

cat > "$STEPS/build_megastream.py" <<'EOF'
import time
t = time.perf_counter()
from megastream import ops

ok = ops.have_ext()
print("megastream C++ ops:", "built" if ok else "NOT built", "| cpu isa", getattr(ops, "cpu_isa", lambda: "?")(),
      "| %.1f s" % (time.perf_counter() - t))
raise SystemExit(0 if ok else 1)
EOF

cat > "$STEPS/build_deepspeed.py" <<'EOF'
import importlib.util, os, sys, time

if importlib.util.find_spec("deepspeed") is None:
    print("DeepSpeed CPU Adam: deepspeed is not importable" + (" (a dry run: skipped)" if os.environ["DRY"] == "1" else ""))
    sys.exit(0 if os.environ["DRY"] == "1" else 1)
os.environ.setdefault("DS_ACCELERATOR", "cuda")
t = time.perf_counter()
from deepspeed.ops.op_builder import CPUAdamBuilder

CPUAdamBuilder().load(verbose=True)
print("DeepSpeed CPU Adam: built | %.1f s" % (time.perf_counter() - t))
EOF

# ---- the plan: step NAME TIMEOUT_S COMMAND DRY_COMMAND ----------------------------------------------
# the quick rows first: a run cut short keeps them, and --carry-over hands each row's unused time to the
# next. FSDP2 (built on the meta device, filled on the GPU: seconds) before DeepSpeed, whose ZeRO-3 init
# outlasted 69 s in the first run, so DeepSpeed gets what FSDP2 leaves.
H2H_ROWS="megastream:full megastream:lean fsdp2 deepspeed"
# 16k tokens a step, as the 7B and 14B targets: a fine-tuning step, where ZeRO-3 and FSDP2 offload pay
# their per-micro-batch parameter fetches and gradient copies once per 4k tokens and megastream once a
# step (the first run, 2026-11-29, timed megastream alone at 8k: 7,297 tokens/s)
SHAPE_3B="--seq-len 1024 --micro-batch-size 4 --grad-accum 4 --steps 2 --warmup 1 --gpu-memory-gb 24 --host-ram-gb $HOST_RAM_GB"
SHAPE_14B="--seq-len 1024 --micro-batch-size 4 --grad-accum 4 --gpu-memory-gb 24 --host-ram-gb $HOST_RAM_GB"
CMD_H2H="$TP --model qwen2.5-3b $SHAPE_3B --systems $H2H_ROWS --timeouts roofline=50 megastream:full=45 fsdp2=100 deepspeed=210 megastream:lean=35 --carry-over --json $OUT_DIR/h2h-qwen2.5-3b.json --logs $STEPS/h2h-3b"
RATES_3B="\$([ -f $OUT_DIR/h2h-qwen2.5-3b.json ] && echo --rates-from $OUT_DIR/h2h-qwen2.5-3b.json)"
CMD_14B="$TP --model qwen2.5-14b $SHAPE_14B --steps 3 --warmup 1 --systems megastream:compact $RATES_3B --profile --profile-steps 2 --timeouts roofline=50 megastream:compact=150 --carry-over --json $OUT_DIR/h2h-qwen2.5-14b.json --logs $STEPS/14b"
RATES_14B="\$([ -f $OUT_DIR/h2h-qwen2.5-14b.json ] && echo --rates-from $OUT_DIR/h2h-qwen2.5-14b.json)"
# the baselines too: on a 128 GB host they are not-run up front (~18 and ~16 B/param of host state), and
# the JSON says so with the figures ("on qwen2.5-7b where it fits")
CMD_7B="$TP --model qwen2.5-7b $SHAPE_14B --steps 3 --warmup 1 --systems megastream:lean fsdp2 deepspeed $RATES_14B --timeouts roofline=50 megastream:lean=55 --carry-over --json $OUT_DIR/h2h-qwen2.5-7b.json --logs $STEPS/7b"

# pytest -m gpu: part 1 runs the engine's GPU tests; the step features' and LoRA's run in parts 3 and 4.
# Each file with gpu tests is in exactly one list (tests/test_gpu_acceptance.py checks it), so no part
# collects the whole suite.
# a later part's setup: the GPU's state (memory in use: nothing left running) and megastream's ops (cached)
GPU_STATE="nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv; $PY $STEPS/build_megastream.py"
PYTEST="$PY -m pytest -m gpu -q -rP -n 0 -p no:cacheprovider"  # -rP: passing tests' prints too (planned vs measured peaks)
ENGINE_TESTS="tests/test_gpu.py tests/test_activations.py"
FEATURE_TESTS="tests/test_varlen_attention.py tests/test_embed_device.py tests/test_flex_attention.py"
LORA_TESTS="tests/test_lora_gpu.py tests/test_quant.py"
PYTEST_1="$PYTEST $ENGINE_TESTS"
# The GPU machine's host is an AVX-512 Xeon (CI's machines may have AVX2 only): the ops' tests on its
# avx512 / avx2 / scalar paths, and the optimizer against torch on its widest path and forced to AVX2.
CMD_CPU_OPS="$PY -m pytest -q -n 0 -p no:cacheprovider tests/test_ops.py; $PY benchmarks/optimizer.py --sizes 46.8e6 --repeats 3 --json $OUT_DIR/optimizer-host.json; MEGASTREAM_CPU_ISA=avx2 $PY benchmarks/optimizer.py --sizes 46.8e6 --repeats 3 --json $OUT_DIR/optimizer-host-avx2.json"

part1() {
  step setup 10 "the carried wheels into $SITE" \
    "ls $WHL/*.whl && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHL/*.whl && ls $SITE" \
    "ls -la $WHL 2>/dev/null || echo 'no .whl/ here (bash scripts/gpu_wheels.sh makes it); a dry run installs nothing'"
  # DeepSpeed's CPU Adam takes ~53 s to JIT-build there (two -O3 -g translation units): built once, in the
  # background under the next steps, and joined before the timed rows
  bgstep ds-build 80 "DeepSpeed's CPU Adam JIT-build, in the background until ds-join" \
    "$PY $STEPS/build_deepspeed.py" "$PY $STEPS/build_deepspeed.py"
  step preflight 35 "Python, compilers, CUDA, host, every import" "$PY $STEPS/preflight.py" "$PY $STEPS/preflight.py"
  step build 30 "megastream's C++ ops, once, before the timed rows" \
    "$PY $STEPS/build_megastream.py" "$PY $STEPS/build_megastream.py"
  step env 10 "megastream env" "$PY -m megastream env" "$PY -m megastream env"
  joinstep ds-join 10 ds-build
  # its dry run checks the GPU command (--check); the rows themselves run on the CPU in test_throughput_harness
  step h2h-3b 450 "qwen2.5-3b head-to-head: $H2H_ROWS" "$CMD_H2H" "$CMD_H2H --check"
}

part2() {
  step setup2 10 "megastream's ops (cached after part 1) and the GPU's state" \
    "$GPU_STATE" \
    "$PY $STEPS/build_megastream.py"
  # first after the setup: a `--part all` run reaches part 2 with what part 1 left, and this step alone
  # completes an issue (the AVX-512 path's optimizer figures); it uses no GPU
  step cpu-ops 120 "the host's AVX-512: the C++ ops' tests on every ISA path it runs, the optimizer benchmark" \
    "$CMD_CPU_OPS" "$PY -m pytest --co -q -p no:cacheprovider tests/test_ops.py && $PY benchmarks/optimizer.py --help"
  step pytest-gpu 130 "the GPU tests (those of parts 3 and 4's features run there)" "$PYTEST_1" "$PYTEST_1"
  step 14b 205 "qwen2.5-14b compact, 24 GB cap, 3 steps + a 2-step profile" "$CMD_14B" "$CMD_14B --check"
  step 7b 60 "qwen2.5-7b megastream rows the host holds" "$CMD_7B" "$CMD_7B --check"
}

# Part 3: one megastream row per step feature, each against megastream:full (the same rows otherwise).
# Sized from the attainable bound at H200-like rates (H2D 50 GB/s, matmul 650 TFLOP/s, masked attention
# 100 TFLOP/s, full-mode AdamW 0.4 ns/param): ~2.3 s a step of 16k tokens (1.2 s of optimizer overlapping
# the forward, 0.8 s of masked attention), 3 steps ~7 s, on top of what part 1's qwen2.5-3b full row
# (35 s for 3 steps of 8k tokens) spends starting: the process, the CUDA context, 51 GB of pinned host
# state. The plan's GPU peak is 7.9 GB, under the 24 GB cap. clip-previous's first step runs twice (a
# norms-only pass); flex compiles its FlexAttention kernels (forward and backward, cold: 75 s) in its
# warm-up step (the second flex row hits the compile cache); in part 4 compile compiles the layer function
# (two graphs, cold inductor: 110 s) in its two warm-up steps and comes last, so that --carry-over hands it
# what the rows before it left. The timeouts of the GPU tests count what run 2 (2026-11-29) left out: its
# pytest-gpu timed out at 90 s with five tests failing fast on a leaked memory cap (fixed), so those now
# run in full, and flex's and quantization's moved to parts 3 and 4, which had room.
FEATURE_ROWS="megastream:full megastream:full+flex megastream:full+varlen megastream:full+clip-previous"
SHAPE_FEAT="--seq-len 8192 --docs-per-row 8 --micro-batch-size 1 --grad-accum 2 --steps 2 --warmup 1 --gpu-memory-gb 24 --host-ram-gb $HOST_RAM_GB"
CMD_FEAT="$TP --model qwen2.5-3b $SHAPE_FEAT --systems $FEATURE_ROWS --timeouts roofline=50 megastream:full=40 megastream:full+flex=75 megastream:full+varlen=45 megastream:full+clip-previous=40 --carry-over --json $OUT_DIR/step-features.json --logs $STEPS/features"
# issue 13's 14B target: compact under the 24 GB cap with optim.clip: previous (no gradient staging) at
# 32k tokens a step, MFU >= 40%: the boundary checkpoints of 32k tokens (16 GB at 14B) go to the host
# (plan: 14.4 GB of GPU, 83 GB of host); the rates from the features step's probe when it ran.
# clip-previous's first step runs twice (a norms-only pass): 2 warm-up steps.
RATES_FEAT="\$([ -f $OUT_DIR/step-features.json ] && echo --rates-from $OUT_DIR/step-features.json)"
CMD_14B32="$TP --model qwen2.5-14b --seq-len 1024 --micro-batch-size 4 --grad-accum 8 --activations host --steps 2 --warmup 2 --gpu-memory-gb 24 --host-ram-gb $HOST_RAM_GB --systems megastream:compact+clip-previous $RATES_FEAT --timeouts roofline=50 megastream:compact+clip-previous=150 --carry-over --json $OUT_DIR/qwen2.5-14b-32k-clip-previous.json --logs $STEPS/14b-32k"

part3() {
  step setup3 40 "megastream's ops (built once: cached after part 1 or 2) and the GPU's state" \
    "$GPU_STATE" \
    "$PY $STEPS/build_megastream.py"
  step pytest-features 70 "the step features' GPU tests (varlen, the embedding on the device, flex's gradients)" \
    "$PYTEST $FEATURE_TESTS" "$PYTEST $FEATURE_TESTS"
  step features 275 "step features before/after, qwen2.5-3b, 8k-token rows of 8 documents: $FEATURE_ROWS" \
    "$CMD_FEAT" "$CMD_FEAT --check"
  step 14b-32k 160 "qwen2.5-14b compact + clip-previous, 32k tokens a step, activations on the host, 24 GB cap" \
    "$CMD_14B32" "$CMD_14B32 --check"
}

# Part 4: the rest of the step features (varlen + clip-previous together, the fastest settings by design;
# embed-host, the path before the embedding's device default; compile) against their own megastream:full row (ratios are taken within one run), then LoRA on the
# GPU (issue 15): benchmarks/lora_step.py's full vs LoRA step on qwen2.5-1.5b (24 GB of pinned full-mode
# state: half of part 3's 3b start-up), and QLoRA over an NF4 base at Qwen2.5-72B's widths, two layers
# (the whole model's 80 only add layers the plan counts the same way), 4k tokens, a 24 GB cap: the GPU
# peak against the plan's, the host store, the time to quantize at init.
FEATURE2_ROWS="megastream:full megastream:full+varlen+clip-previous megastream:full+embed-host megastream:full+compile"
CMD_FEAT2="$TP --model qwen2.5-3b $SHAPE_FEAT --systems $FEATURE2_ROWS --warmups megastream:full+compile=2 --timeouts roofline=50 megastream:full=40 megastream:full+varlen+clip-previous=45 megastream:full+embed-host=40 megastream:full+compile=110 --carry-over --json $OUT_DIR/step-features-2.json --logs $STEPS/features2"
LS="$PY benchmarks/lora_step.py"
CMD_LORA="$LS --device cuda --preset qwen2.5-1.5b --seq-len 4096 --micro-batch 1 --grad-accum 2 --rounds 2 --steps 1 --json $OUT_DIR/lora-step-qwen2.5-1.5b.json"
CMD_QLORA="$LS --device cuda --preset qwen2.5-72b --layers 2 --modes lora --base-dtype nf4 --seq-len 4096 --micro-batch 1 --grad-accum 1 --gpu-memory-gb 24 --rounds 1 --steps 3 --json $OUT_DIR/qlora-qwen2.5-72b-2-layers.json"

part4() {
  step setup4 40 "megastream's ops (built once: cached after an earlier part on this machine) and the GPU's state" \
    "$GPU_STATE" \
    "$PY $STEPS/build_megastream.py"
  step pytest-lora 90 "LoRA's and quantization's GPU tests (adapters vs the CPU, dequantization, the plan's GPU peak)" \
    "$PYTEST $LORA_TESTS" "$PYTEST $LORA_TESTS"
  step features2 285 "step features before/after, qwen2.5-3b, 8k-token rows of 8 documents: $FEATURE2_ROWS" \
    "$CMD_FEAT2" "$CMD_FEAT2 --check"
  step lora 50 "LoRA vs full fine-tuning step, qwen2.5-1.5b, 8k tokens" "$CMD_LORA" "$CMD_LORA --check"
  step qlora-72b 45 "QLoRA, NF4 base at Qwen2.5-72B's widths (2 layers), 4k tokens, 24 GB cap: GPU peak vs plan" \
    "$CMD_QLORA" "$CMD_QLORA --check"
}

# ---- the runner -------------------------------------------------------------------------------------
# step NAME TIMEOUT_S WHAT COMMAND DRY_COMMAND   runs in the foreground under `timeout`
# bgstep (same arguments)                        starts in the background under `timeout`, overlapping the
#                                                next steps; its timeout is not added to the part's sum, but
#                                                must fit under the steps it overlaps up to its join
# joinstep NAME TIMEOUT_S BGNAME                 waits (at most TIMEOUT_S more) for BGNAME, then records both
MODE=plan
PLAN_BAD=0
PLAN_SUM=0
BG_OVERLAP=0
CUR=0
declare -a ROWS
declare -A BG_T0 BG_LIMIT BG_PID BG_T
BG_RUNNING=0
json_str() { $PY -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

plan_line() {  # name timeout what cmd background
  printf '  %-11s %4d s  %s\n      $ %s\n' "$1" "$2" "$3" "$4"
  printf '{"part": %s, "step": "%s", "timeout_s": %d, "background": %s, "what": %s, "command": %s}\n' "$CUR" "$1" "$2" \
    "$5" "$(json_str "$3")" "$(json_str "$4")" >> "$STEPS/plan.jsonl"
}

record() {  # name rc seconds timeout limit
  local status
  case $2 in 0) status=ok ;; 124|137) status=timeout ;; 200) status=skipped ;; *) status="fail($2)" ;; esac
  tail -n 25 "$STEPS/$1.log" | sed 's/^/   | /'
  echo "== [part $CUR] $1: $status in $3 s (timeout $5 s; part elapsed $(elapsed "$PART_T0" "$(now)") s)"
  ROWS+=("$CUR|$1|$status|$3|$4")
  printf '{"part": %s, "step": "%s", "status": "%s", "rc": %d, "seconds": %s, "timeout_s": %d, "limit_s": %d, "log": "steps/%s.log"}\n' \
    "$CUR" "$1" "$status" "$2" "$3" "$4" "$5" "$1" >> "$STEPS/results.jsonl"
}

clear_stale_locks() {
  # Between steps nothing builds but a background step: a torch-extension lock left now is stale (a build
  # killed at its timeout) and would make every later load of that extension wait forever.
  find "${MEGASTREAM_CACHE:-$HOME/.cache/megastream}" -maxdepth 2 -name lock -delete 2>/dev/null
  [ "$BG_RUNNING" = 0 ] && find "$TORCH_EXTENSIONS_DIR" -maxdepth 2 -name lock -delete 2>/dev/null
  return 0
}

step() {
  local name=$1 t=$2 what=$3 cmd=$4
  [ "$DRY" = 1 ] && cmd=$5
  if [ "$MODE" = plan ]; then
    PLAN_SUM=$((PLAN_SUM + t)); BG_OVERLAP=$((BG_OVERLAP + t))
    plan_line "$name" "$t" "$what" "$cmd" false
    return
  fi
  local limit=$t t0 rc left
  [ "$DRY" = 1 ] && limit=$((t * DRY_SCALE))
  if [ -n "$DEADLINE" ]; then  # a step that could run past --deadline is skipped, not started
    left=$(awk -v d="$DEADLINE" -v s="$START" -v n="$(now)" 'BEGIN { printf "%d", d - (n - s) }')
    if [ "$left" -lt "$limit" ]; then
      echo "skipped: its ${limit} s timeout is over the ${left} s left before --deadline ${DEADLINE} s" > "$STEPS/$name.log"
      record "$name" 200 0 "$t" "$limit"
      return
    fi
  fi
  clear_stale_locks
  t0=$(now)
  echo "== [part $CUR] $name (timeout ${limit}s): $what"
  timeout -k 10 "$limit" bash -c "$cmd" > "$STEPS/$name.log" 2>&1
  rc=$?
  # A harness row runs in its own session; the harness ends its rows when stopped, and this sweeps any
  # it could not (a SIGKILL), so that no row of a timed-out step runs on under the next step's
  # measurements (the GPU machine runs nothing else; a dry run sweeps nothing: tests run beside it)
  if [ "$DRY" != 1 ] && { [ $rc = 124 ] || [ $rc = 137 ]; }; then
    pkill -KILL -f "benchmarks/throughput.py --worker" 2>/dev/null
  fi
  record "$name" "$rc" "$(elapsed "$t0" "$(now)")" "$t" "$limit"
}

bgstep() {
  local name=$1 t=$2 what=$3 cmd=$4
  [ "$DRY" = 1 ] && cmd=$5
  if [ "$MODE" = plan ]; then
    BG_OVERLAP=0; BG_LIMIT[$name]=$t
    plan_line "$name" "$t" "$what" "$cmd" true
    return
  fi
  local limit=$t
  [ "$DRY" = 1 ] && limit=$((t * DRY_SCALE))
  clear_stale_locks
  rm -f "$STEPS/$name.rc"
  BG_T0[$name]=$(now); BG_LIMIT[$name]=$limit; BG_T[$name]=$t
  ( timeout -k 10 "$limit" bash -c "$cmd" > "$STEPS/$name.log" 2>&1; echo $? > "$STEPS/$name.rc"; now > "$STEPS/$name.end" ) &
  BG_PID[$name]=$!
  BG_RUNNING=$((BG_RUNNING + 1))
  echo "== [part $CUR] $name (timeout ${limit}s) started in the background: $what"
}

joinstep() {
  local name=$1 t=$2 bg=$3
  if [ "$MODE" = plan ]; then
    PLAN_SUM=$((PLAN_SUM + t)); BG_OVERLAP=$((BG_OVERLAP + t))
    plan_line "$name" "$t" "wait for $bg (its ${BG_LIMIT[$bg]} s fit under the $BG_OVERLAP s of steps since it started)" \
      "wait for $bg" false
    if [ "${BG_LIMIT[$bg]}" -gt "$BG_OVERLAP" ]; then
      echo "  PLAN ERROR: $bg's timeout ${BG_LIMIT[$bg]} s is over the $BG_OVERLAP s until $name"; PLAN_BAD=1
    fi
    return
  fi
  local limit=$t t0
  [ "$DRY" = 1 ] && limit=$((t * DRY_SCALE))
  t0=$(now)
  echo "== [part $CUR] $name (timeout ${limit}s): wait for $bg"
  while [ ! -f "$STEPS/$bg.end" ] && [ "$(elapsed "$t0" "$(now)" | cut -d. -f1)" -lt "$limit" ]; do sleep 1; done
  if [ -f "$STEPS/$bg.end" ]; then
    echo "$bg ended" > "$STEPS/$name.log"
    record "$bg" "$(cat "$STEPS/$bg.rc")" "$(elapsed "${BG_T0[$bg]}" "$(cat "$STEPS/$bg.end")")" "${BG_T[$bg]}" "${BG_LIMIT[$bg]}"
    record "$name" 0 "$(elapsed "$t0" "$(now)")" "$t" "$limit"
  else
    echo "$bg still running after the join's ${limit} s: stopped" > "$STEPS/$name.log"
    pkill -TERM -P "${BG_PID[$bg]}" 2>/dev/null; wait "${BG_PID[$bg]}" 2>/dev/null
    record "$bg" 124 "$(elapsed "${BG_T0[$bg]}" "$(now)")" "${BG_T[$bg]}" "${BG_LIMIT[$bg]}"
    record "$name" 124 "$(elapsed "$t0" "$(now)")" "$t" "$limit"
  fi
  unset "BG_PID[$bg]"
  BG_RUNNING=$((BG_RUNNING - 1))
}

parts=()
case "$PART" in 1) parts=(1) ;; 2) parts=(2) ;; 3) parts=(3) ;; 4) parts=(4) ;; all) parts=(1 2) ;; esac
: > "$STEPS/plan.jsonl"; : > "$STEPS/results.jsonl"
echo "gpu_acceptance.sh: parts ${parts[*]}$([ "$DRY" = 1 ] && echo ' (DRY RUN: the CPU, tiny shapes)') -> $OUT_DIR"
if command -v git > /dev/null && git -C "$REPO" rev-parse HEAD > /dev/null 2>&1; then
  REV="commit $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD || echo ' + local changes')"
else
  REV="no git checkout"
fi
echo "$REV, $(uname -n), $(date -Is)"
echo "plan (each step under its own timeout; a failing step never stops the next):"
for p in "${parts[@]}"; do
  CUR=$p; PLAN_SUM=0
  echo " part $p:"
  "part$p"
  budget_var=BUDGET_$p
  echo "  part $p: timeouts sum to $PLAN_SUM s (budget ${!budget_var} s)"
  [ "$PLAN_SUM" -le "${!budget_var}" ] || { echo "  PLAN ERROR: part $p's timeouts are over its budget"; PLAN_BAD=1; }
done

[ "$PLAN_BAD" = 0 ] || exit 2
MODE=run
START=$(now)
for p in "${parts[@]}"; do
  CUR=$p
  PART_T0=$(now)
  "part$p"
  echo "== part $p done in $(elapsed "$PART_T0" "$(now)") s"
done

# ---- summary ----------------------------------------------------------------------------------------
{
  echo "gpu_acceptance.sh summary$([ "$DRY" = 1 ] && echo ' (DRY RUN)'): $(date -Is), $(uname -n), $REV"
  printf '%-6s %-12s %-10s %9s %9s\n' part step status seconds timeout
  for r in "${ROWS[@]}"; do IFS='|' read -r p n s sec t <<< "$r"; printf '%-6s %-12s %-10s %9s %9s\n' "$p" "$n" "$s" "$sec" "$t"; done
  echo "total $(elapsed "$START" "$(now)") s"
} | tee -a "$OUT_DIR/summary.txt"
$PY - "$OUT_DIR" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
path = out / "acceptance.json"
doc = json.loads(path.read_text()) if path.exists() else {"parts": {}}
plan = [json.loads(l) for l in (out / "steps" / "plan.jsonl").read_text().splitlines() if l.strip()]
res = [json.loads(l) for l in (out / "steps" / "results.jsonl").read_text().splitlines() if l.strip()]
for p in sorted({r["part"] for r in plan}):
    steps = [r for r in res if r["part"] == p]
    doc["parts"][str(p)] = {"dry_run": dry, "plan": [r for r in plan if r["part"] == p], "steps": steps,
                            "timeouts_s": sum(r["timeout_s"] for r in plan if r["part"] == p and not r["background"]),
                            "seconds": sum(r["seconds"] for r in steps),
                            "ok": all(r["status"] == "ok" for r in steps)}
for name in sorted([*out.glob("h2h-*.json"), *out.glob("step-features*.json")]):
    try:
        d = json.loads(name.read_text())
        doc.setdefault("results", {})[name.name] = {"model": d["model"], "headline": d.get("headline"),
            "variants": {k: v["ratio"] for k, v in d.get("variants", {}).items()}, "unmeasured": d.get("unmeasured"),
            "systems": {s["name"]: {k: s.get(k) for k in ("status", "tokens_per_s", "ideal_fraction",
                                                           "attainable_fraction", "peak_host_gb", "peak_gpu_gb",
                                                           "message")} for s in d["systems"]}}
    except (ValueError, KeyError) as e:
        doc.setdefault("results", {})[name.name] = {"error": f"{type(e).__name__}: {e}"}
path.write_text(json.dumps(doc, indent=2))
EOF
tar -czf "$OUT_DIR/logs-part$PART.tar.gz" -C "$OUT_DIR" steps
[ "$PACK" = 1 ] && rm -rf "$STEPS"
echo "wrote $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
[ "${#ROWS[@]}" -gt 0 ] || exit 1
for r in "${ROWS[@]}"; do IFS='|' read -r _ _ s _ _ <<< "$r"; [ "$s" = ok ] || exit 1; done
exit 0
