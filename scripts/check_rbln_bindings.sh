#!/usr/bin/env bash
# The rbln-sys bindings check (see scripts/check_bindings.sh); --write regenerates them.
exec "$(dirname "$0")/check_bindings.sh" rbln-sys "$@"
