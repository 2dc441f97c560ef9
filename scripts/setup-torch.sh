#!/usr/bin/env bash
# Makes PyTorch 2.13.0 (the version tch 0.26 binds) available to the build, unless LIBTORCH
# already points at a libtorch: installs the `torch==2.13.0` wheel from the Python package
# registry into a virtualenv cached outside the clone (~/.cache/loom/torch-2.13.0, about 4.7 GB,
# reused by every clone and CI run on the machine). Prints the `export` lines to use.
set -euo pipefail
TORCH_VERSION=2.13.0
if [ -n "${LIBTORCH:-}" ]; then
  [ -f "$LIBTORCH/lib/libtorch.so" ] || { echo "setup-torch: LIBTORCH=$LIBTORCH has no lib/libtorch.so" >&2; exit 1; }
  echo "export LIBTORCH=$LIBTORCH"
  exit 0
fi
CACHE="${LOOM_CACHE_DIR:-$HOME/.cache/loom}"
VENV="$CACHE/torch-$TORCH_VERSION"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup-torch: installing torch==$TORCH_VERSION into $VENV (one time, ~4.7 GB)" >&2
  rm -rf "$VENV.partial"
  python3 -m venv "$VENV.partial"
  "$VENV.partial/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
  rm -rf "$VENV"
  mv "$VENV.partial" "$VENV"
  # The venv's scripts carry the path they were created at: recreate them at the final one.
  python3 -m venv --upgrade "$VENV" >/dev/null
fi
TORCH_DIR="$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
echo "export LIBTORCH=$TORCH_DIR"
echo "export LD_LIBRARY_PATH=$TORCH_DIR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
