#!/usr/bin/env bash
# Checks that the committed <crate>/src/bindings.rs of a -sys crate (rbln-sys, ascend-sys)
# is exactly what bindgen makes of <crate>/wrapper.h today; with --write, regenerates it
# instead. Needs libclang (Debian: apt-get install libclang-dev); a normal build of the
# crates needs neither libclang nor the vendor SDK.
set -euo pipefail
cd "$(dirname "$0")/.."

crate=${1:?usage: scripts/check_bindings.sh rbln-sys|ascend-sys [--write]}
case "$crate" in
  rbln-sys) out_var=RBLN_SYS_BINDINGS_OUT ;;
  ascend-sys) out_var=ASCEND_SYS_BINDINGS_OUT ;;
  *) echo "unknown -sys crate $crate" >&2; exit 2 ;;
esac
committed=$crate/src/bindings.rs
fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
# build.rs (feature `bindgen`) writes the bindings to $OUT_DIR and copies them here.
env "$out_var=$fresh" cargo check --quiet -p "$crate" --features bindgen

if [[ "${2:-}" == "--write" ]]; then
  cp "$fresh" "$committed"
  echo "wrote $committed"
elif diff -u "$committed" "$fresh"; then
  echo "$crate bindings are current"
else
  echo "$committed is stale: run scripts/check_bindings.sh $crate --write" >&2
  exit 1
fi
