#!/usr/bin/env bash
# The storage benchmark's extras, one command (root, Debian/Ubuntu; needs /dev/fuse):
#   bash benchmarks/setup_storage.sh [VENV]      # default VENV: .venv-storage in the repository (git-ignored)
# Debian's fuse3 and libfuse3-dev (+ gcc, pkg-config), the mount's C server (latency_fs_server.c) built
# into VENV/bin, and a venv of its own with the project's requirements plus webdataset
# (benchmarks/requirements-storage.txt), so the project's venv stays as it is.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$(dirname "$here")/.venv-storage}"
[ -e /dev/fuse ] || { echo "error: no /dev/fuse (a container needs --device /dev/fuse)" >&2; exit 2; }
if ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null || ! command -v gcc >/dev/null
then
    apt-get update -qq && apt-get install -y fuse3 libfuse3-dev gcc pkg-config
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$here/requirements-storage.txt"
# shellcheck disable=SC2046   # pkg-config's flags are meant to split
gcc -O2 -Wall "$here/latency_fs_server.c" $(pkg-config --cflags --libs fuse3) -o "$venv/bin/latency-fs-server"
echo "ready: $venv/bin/python benchmarks/storage.py --pool DIR --quick --no-write"
