#!/usr/bin/env bash
# The storage benchmark's extras, one command (root, Debian/Ubuntu; needs /dev/fuse):
#   bash benchmarks/setup_storage.sh [VENV]      # default VENV: .venv-storage in the repository (git-ignored)
# Debian's fuse3 (libfuse3 + fusermount3), then a venv of its own with the project's requirements plus
# mfusepy and webdataset (benchmarks/requirements-storage.txt), so the project's venv stays as it is.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$(dirname "$here")/.venv-storage}"
[ -e /dev/fuse ] || { echo "error: no /dev/fuse (a container needs --device /dev/fuse)" >&2; exit 2; }
command -v fusermount3 >/dev/null || { apt-get update -qq && apt-get install -y fuse3; }
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$here/requirements-storage.txt"
echo "ready: $venv/bin/python benchmarks/storage.py --pool DIR --quick --no-write"
