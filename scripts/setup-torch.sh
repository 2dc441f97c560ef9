#!/usr/bin/env bash
# Makes PyTorch 2.13.0 (the version tch 0.26 binds) available to the build, unless LIBTORCH
# already points at a libtorch: installs the `torch==2.13.0` wheel from the Python package
# registry into a virtualenv cached outside the clone (${LOOM_CACHE_DIR:-~/.cache/loom}/torch-2.13.0,
# about 4.7 GB, reused by every clone and CI run on the machine). Prints the `export` lines to
# eval: `eval "$(bash scripts/setup-torch.sh)"`.
set -euo pipefail
TORCH_VERSION=2.13.0
if [ -n "${LIBTORCH:-}" ]; then
  [ -f "$LIBTORCH/lib/libtorch.so" ] || { echo "setup-torch: LIBTORCH=$LIBTORCH has no lib/libtorch.so" >&2; exit 1; }
  echo "export LIBTORCH=$LIBTORCH"
  echo "export LD_LIBRARY_PATH=$LIBTORCH/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
  exit 0
fi
CACHE="${LOOM_CACHE_DIR:-$HOME/.cache/loom}"
VENV="$CACHE/torch-$TORCH_VERSION"
installed() {
  "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null
}
if ! installed; then
  echo "setup-torch: installing torch==$TORCH_VERSION into $VENV (one time, ~4.7 GB)" >&2
  # Installed in place (a venv's scripts record its path); an interrupted install fails the
  # check above next time and starts over.
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" >&2
  installed || { echo "setup-torch: torch $TORCH_VERSION did not install into $VENV" >&2; exit 1; }
fi
TORCH_DIR="$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)"
echo "export LOOM_TORCH_PYTHON=$VENV/bin/python"
echo "export LIBTORCH=$TORCH_DIR"
echo "export LD_LIBRARY_PATH=$TORCH_DIR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
