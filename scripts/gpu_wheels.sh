#!/usr/bin/env bash
# Wheels the GPU benchmark machine lacks (it has no network), every one pinned to an exact version,
# for its image: Python 3.12 (cp312), torch 2.11.0+cu130, transformers 5.17, peft, accelerate, no
# DeepSpeed (/work/.library/device/KINDS.md). Output: .whl/ (ignored by git; carried to the machine,
# <= 60 MB), replaced on every run so it holds exactly one version of each.
#
#   deepspeed 0.19.8       published only as a source archive: built here into a pure-Python wheel with
#                          DS_BUILD_OPS=0; its ops (CPU Adam) JIT-build there with g++ and ninja
#   hjson, pydantic + its exact pydantic-core (cp312 manylinux), annotated-types, typing-inspection,
#   typing-extensions      DeepSpeed's pure-Python needs the image does not hold (or holds too old:
#                          pydantic 2.14 needs typing-extensions >= 4.16)
# DeepSpeed's other needs are in the image: einops, msgpack, ninja, numpy, packaging, psutil,
# py-cpuinfo, torch, tqdm. The script checks that every Requires-Dist of every wheel is met by the
# carried set (version included) or named in that image list, and the total size.
#
#   bash scripts/gpu_wheels.sh
# There (scripts/gpu_acceptance.sh does it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET_PY=3.12
DEEPSPEED="deepspeed==0.19.8"
PINS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0)
IMAGE_HAS="einops msgpack ninja numpy packaging psutil py-cpuinfo torch tqdm"
MAX_MB=60

ex="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$ex")"; grep -qx "/.whl/" "$ex" 2>/dev/null || echo /.whl/ >> "$ex"
mkdir -p .whl
rm -f .whl/*.whl
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "$DEEPSPEED"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${PINS[@]}"

$PY - "$MAX_MB" "$IMAGE_HAS" "$DEEPSPEED" "${PINS[@]}" <<'EOF'
import sys, zipfile
from email.parser import Parser
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

max_mb, image = float(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
pins = {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in sys.argv[3:]}
wheels = sorted(Path(".whl").glob("*.whl"))
have, problems = {}, []
for w in wheels:
    name, version, _, _ = parse_wheel_filename(w.name)
    if name in have:
        problems.append(f"two versions of {name}: {have[name]} and {version}")
    have[name] = version
for name, v in pins.items():
    if str(have.get(name)) != v:
        problems.append(f"{name}: pinned {v}, got {have.get(name)}")
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    for line in meta.get_all("Requires-Dist") or []:
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate({"extra": "", "python_version": "3.12",
                                                           "python_full_version": "3.12.3"}):
            continue  # an extra, or another Python
        n = canonicalize_name(r.name)
        if n in have:
            if not r.specifier.contains(str(have[n]), prereleases=True):
                problems.append(f"{w.name} needs {r}, carried {n} {have[n]}")
        elif n not in image:
            problems.append(f"{w.name} needs {r}: neither carried nor in the image list")
mb = sum(w.stat().st_size for w in wheels) / 1e6
for w in wheels:
    print(f"  {w.name}  {w.stat().st_size / 1e6:.2f} MB")
print(f".whl/: {len(wheels)} wheels, {mb:.1f} MB (limit {max_mb:g} MB)")
if mb > max_mb:
    problems.append(f".whl/ is {mb:.1f} MB, over {max_mb:g} MB")
if problems:
    sys.exit("gpu_wheels.sh: " + "; ".join(problems))
print("every requirement is met by the carried wheels or the GPU image")
EOF
