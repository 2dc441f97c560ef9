#!/bin/sh
# Regenerates the committed fallback object bpf/loom_probes.bpf.o with the same
# clang command that build.rs runs (x86_64 host; pass ARCH=aarch64 etc. to change).
# Needs: clang (14 or later) and libbpf-dev (bpf/bpf_helpers.h, bpf_core_read.h ...).
set -eu
cd "$(dirname "$0")"
ARCH="${ARCH:-$(uname -m)}"
case "$ARCH" in
  x86_64)  DEF=x86;   MULTIARCH=x86_64-linux-gnu ;;
  aarch64) DEF=arm64; MULTIARCH=aarch64-linux-gnu ;;
  *) echo "build-object.sh: unsupported ARCH $ARCH" >&2; exit 1 ;;
esac
clang -O2 -g -target bpf -Wall -Werror -fdebug-prefix-map="$(pwd)"=. \
  -D__TARGET_ARCH_$DEF -I/usr/include/$MULTIARCH \
  -c loom_probes.bpf.c -o loom_probes.bpf.o
echo "wrote $(pwd)/loom_probes.bpf.o"
