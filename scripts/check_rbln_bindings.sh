#!/usr/bin/env bash
# Checks that the committed rbln-sys/src/bindings.rs is exactly what bindgen makes of
# rbln-sys/wrapper.h today; with --write, regenerates it instead. Needs libclang
# (Debian: apt-get install libclang-dev); a normal build of rbln-sys needs neither.
set -euo pipefail
cd "$(dirname "$0")/.."

committed=rbln-sys/src/bindings.rs
fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
# build.rs (feature `bindgen`) writes the bindings to $OUT_DIR and copies them here.
RBLN_SYS_BINDINGS_OUT="$fresh" cargo check --quiet -p rbln-sys --features bindgen

if [[ "${1:-}" == "--write" ]]; then
  cp "$fresh" "$committed"
  echo "wrote $committed"
elif diff -u "$committed" "$fresh"; then
  echo "rbln-sys bindings are current"
else
  echo "rbln-sys/src/bindings.rs is stale: run scripts/check_rbln_bindings.sh --write" >&2
  exit 1
fi
