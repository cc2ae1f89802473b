#!/usr/bin/env bash
# The carry set for the GPU machine this project borrows: it has no internet and nothing can be installed there from
# a registry. It has Python 3.12.3, torch 2.11.0+cu130, transformers 5.17.0, triton 3.6.0, accelerate, safetensors,
# tokenizers, tiktoken (versions in MACHINE below), but no plotly, ipywidgets, openai-harmony, quicktok-v1 or kernels.
# This script downloads here, into .gpu-wheels/ (git-ignored), the wheels benchmarks/gpu_suite.py needs there (at
# this project's lock versions, requirements/lock.txt): transformers (5.17 is too old for the workbench: its
# GptOssConfig has no swiglu_alpha) and the widget's ipywidgets + plotly with their pure-Python dependencies. It
# checks that every requirement of every wheel is met by the carry set or by that machine, that the carry set and
# the working tree that travels with it stay under 64 MiB, and prints the command that installs them there and runs
# the suite. The workbench itself travels as source (the suite imports it from the checkout).
#
#   bash scripts/gpu_wheels.sh           # download into .gpu-wheels/, check, print the command for the GPU machine
#   bash scripts/gpu_wheels.sh --list    # only print the pinned wheels (no network)
#   bash scripts/gpu_wheels.sh --command # only print the command for the GPU machine (no network)
#   bash scripts/gpu_wheels.sh --check   # also try it here first: a virtualenv .gpu-venv/ as close to that machine as
#                                        # registries allow (Python 3.12, the PyPI torch 2.11.0 build = cu130 with
#                                        # its CUDA libraries, transformers 5.17.0 etc.), the carry set installed into
#                                        # it exactly as there, then gpu_suite.py --tiny end to end (~3.5 GB download)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.gpu-wheels
LIMIT_MIB=64
# Carried, at the versions of requirements/lock.txt. Everything else the suite imports is on that machine.
CARRY="transformers plotly ipywidgets widgetsnbextension jupyterlab-widgets comm traitlets ipython
ipython-pygments-lexers jedi parso matplotlib-inline pexpect ptyprocess prompt-toolkit wcwidth stack-data executing
asttokens pure-eval"
# That machine's Python packages (device notes, 2026-11): name or name==version where a version was read there.
MACHINE="torch==2.11.0 transformers==5.17.0 triton==3.6.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2
huggingface-hub==1.33.0 numpy==2.5.2 tiktoken==0.14.0 jaxtyping==0.3.11 annotated-doc anyio attrs certifi
charset-normalizer click colorama contourpy cycler einops filelock fsspec h11 hf-xet httpcore httpx idna iniconfig
jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl mpmath narwhals networkx packaging
pandas pillow pip platformdirs pluggy psutil pygments pyparsing pytest python-dateutil pyyaml regex requests rich
scipy setuptools shellingham six sympy tqdm typer typing-extensions urllib3 wheel wrapt zipp"
PY_VERSION=3.12
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64"

pins() {  # name==version for each carried package, from the lock
    local name version
    for name in $CARRY; do
        version=$(grep -i -E "^${name}==" requirements/lock.txt | head -1 | sed -E 's/^[^=]+==([^ ]+).*/\1/')
        if [ -z "$version" ]; then echo "gpu_wheels.sh: $name is not in requirements/lock.txt" >&2; exit 1; fi
        echo "$name==$version"
    done
}

device_command() {  # what runs on the GPU machine, in the repository root, with .gpu-wheels carried and $OUT set
    echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site" \
         "$WHEELS/*.whl || exit 1; export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; set -o pipefail;" \
         "python3 benchmarks/gpu_suite.py --json \$OUT/gpu_suite.json 2>&1 | tee \$OUT/gpu_suite.log"
}

PIP="python3 -m pip"
[ -x .venv/bin/python ] && PIP=".venv/bin/python -m pip"

main() {  # one function, read whole before it runs: editing this file during a run cannot change the run
if [ "${1:-}" = "--list" ]; then pins; return 0; fi
if [ "${1:-}" = "--command" ]; then device_command; return 0; fi

# ---- download -----------------------------------------------------------------------------------------------------
mkdir -p "$WHEELS"
PINS=$(pins)
# shellcheck disable=SC2086
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp $PLATFORMS \
    -d "$WHEELS" $PINS
# keep one version of each (two stop the whole install there): drop wheels of earlier pins
keep=$(for p in $PINS; do n=${p%%==*}; echo "$(echo "$n" | tr '-' '_' | tr '[:upper:]' '[:lower:]')-${p##*==}-"; done)
for f in "$WHEELS"/*; do
    base=$(basename "$f" | tr '[:upper:]' '[:lower:]')
    echo "$keep" | grep -q -F -x -e "$(echo "$base" | sed -E 's/^([^-]+-[^-]+-).*/\1/')" || { echo "removing stale $f"; rm -f "$f"; }
done

# ---- check: every requirement met there, one version of each, size ------------------------------------------------
PYTHON=python3
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
WHEELS="$WHEELS" MACHINE="$MACHINE" LIMIT_MIB="$LIMIT_MIB" "$PYTHON" - <<'EOF'
import email.parser, os, pathlib, subprocess, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder = pathlib.Path(os.environ["WHEELS"])
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
machine = {}
for item in os.environ["MACHINE"].split():
    name, _, version = item.partition("==")
    machine[canonicalize_name(name)] = version or None
carried, problems = {}, []
for wheel in sorted(folder.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(wheel.name)
    if name in carried:
        problems.append(f"two versions of {name}: {carried[name][0]} and {version}")
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = email.parser.Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    carried[name] = (version, requires)
for name, (version, requires) in carried.items():
    for text in requires:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in carried:
            if not req.specifier.contains(carried[dep][0], prereleases=True):
                problems.append(f"{name} needs {req}, the carry set has {dep} {carried[dep][0]}")
        elif dep in machine:
            there = machine[dep]
            if there and not req.specifier.contains(there, prereleases=True):
                problems.append(f"{name} needs {req}, the GPU machine has {dep} {there}: carry it")
        else:
            problems.append(f"{name} needs {req}, which neither the carry set nor the GPU machine has")
carry = sum(w.stat().st_size for w in folder.glob("*.whl"))
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.decode().split("\0")
tree = sum(p.stat().st_size for p in map(pathlib.Path, files) if p.is_file() and not p.is_symlink())
if pathlib.Path("shared").is_dir():
    tree += sum(p.stat().st_size for p in pathlib.Path("shared").rglob("*") if p.is_file())
mib, limit = 2**20, int(os.environ["LIMIT_MIB"])
print(f"carry set: {len(carried)} wheels, {carry / mib:.1f} MiB in {folder}/; working tree that travels with it: "
      f"{tree / mib:.1f} MiB; together {(carry + tree) / mib:.1f} MiB of {limit} MiB")
if carry + tree > limit * mib:
    problems.append(f"over the {limit} MiB a call may send: {(carry + tree) / mib:.1f} MiB")
if problems:
    sys.exit("gpu_wheels.sh: " + "\n  ".join(["the carry set would fail there:", *problems]))
print("every requirement of the carried wheels is met by the carry set or by the GPU machine's packages")
EOF

if [ "${1:-}" = "--check" ]; then
    # ---- the closest environment available here ---------------------------------------------------------------
    VENV=.gpu-venv
    if [ ! -f "$VENV/.ready" ]; then
        PY312=
        for candidate in python3.12 $(ls -d "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 \
                                     2>/dev/null | sort -V -r); do  # a pyenv shim may exist yet not run
            if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
                PY312=$candidate; break
            fi
        done
        [ -n "$PY312" ] || { echo "gpu_wheels.sh --check: no python3.12 here (the GPU machine has 3.12.3)" >&2; exit 1; }
        rm -rf "$VENV"
        "$PY312" -m venv "$VENV"
        VPIP="$VENV/bin/python -m pip install -q"
        # PyPI's torch 2.11.0 for Linux x86-64 is the cu130 build that machine has; it loads its CUDA libraries at
        # import even without a GPU. Where torch's exact pins are not on the index (cudnn, nccl) a later release of
        # the same major version stands in: only GPU kernels use them, and none run here.
        $VPIP --no-deps torch==2.11.0
        $VPIP "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.2" \
            "cuda-bindings>=13.0.3,<14" "nvidia-cudnn-cu13>=9.19,<10" nvidia-cusparselt-cu13==0.8.0 \
            "nvidia-nccl-cu13>=2.28.9,<3" nvidia-nvshmem-cu13==3.4.5 triton==3.6.0 filelock typing-extensions \
            "setuptools<82" sympy networkx jinja2 fsspec
        # that machine's versions (MACHINE above) of what the suite imports; no plotly, ipywidgets, harmony, kernels
        $VPIP transformers==5.17.0 accelerate==1.15.0 huggingface-hub==1.33.0 numpy==2.5.2 safetensors==0.8.0 \
            tokenizers==0.23.2 tiktoken==0.14.0 einops psutil tqdm narwhals pygments pytest
        touch "$VENV/.ready"
    fi
    for absent in plotly ipywidgets IPython openai_harmony quicktok kernels; do
        if "$VENV/bin/python" -c "import $absent" 2>/dev/null; then
            echo "gpu_wheels.sh --check: $absent is installed in $VENV, the GPU machine has none" >&2; exit 1
        fi
    done
    # the carry set, installed as the device command installs it
    rm -rf "$VENV/site"
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$VENV/site" "$WHEELS"/*.whl
    echo "running gpu_suite.py --tiny in $VENV ($("$VENV/bin/python" --version), torch 2.11.0) with the carry set"
    PYTHONPATH="$VENV/site" HF_HUB_OFFLINE=1 "$VENV/bin/python" benchmarks/gpu_suite.py --tiny \
        --json "$VENV/gpu_suite_tiny.json" > "$VENV/gpu_suite_tiny.log" 2>&1 \
        || { tail -40 "$VENV/gpu_suite_tiny.log"; echo "gpu_wheels.sh --check: the suite failed" >&2; exit 1; }
    "$VENV/bin/python" - "$VENV/gpu_suite_tiny.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m, d = r["machine"], r["decode_tokens_per_s"]
problems = [f"{k} missing" for k in ("generate", "chat", "widget") if not d.get(k)]
problems += [] if "/site/" in m["transformers_from"] else [f"transformers came from {m['transformers_from']}"]
problems += [] if r["agreement"].get("routing_identical") else ["packed and bf16 disagree"]
print(f"--tiny ran end to end in {r['total_seconds']} s: Python {m['python']}, torch {m['torch']}, transformers "
      f"{m['transformers']} ({m['transformers_from']}), ipywidgets {m['ipywidgets']}, plotly {m['plotly']}; "
      f"decode tok/s generate {d['generate']} / chat {d['chat']} / widget {d['widget']}")
sys.exit("gpu_wheels.sh --check: " + "; ".join(problems) if problems else 0)
EOF
fi

echo
echo "On the GPU machine: the checkout with $WHEELS/ beside it (this project's device tool: carry [\"$WHEELS\"],"
echo "timeout_s 480); in the repository root, with OUT set to a folder for the results:"
echo
device_command
}

main "$@"
