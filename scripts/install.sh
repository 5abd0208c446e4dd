#!/usr/bin/env bash
# Create ./.venv (if missing) and install torchtune-blah with its test tools into it.
# torch goes first: pip then takes the 2.13.0 CPU wheel from this machine's disk. Left to
# resolve torch on its own (through torchtune/torchao), pip may pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".[dev]"
