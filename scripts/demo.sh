#!/usr/bin/env bash
# Set up, then build the default image (examples/hello), boot it and show what it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> mvmctl build examples/hello"
.venv/bin/mvmctl build examples/hello
echo "==> mvmctl run examples/hello --attached"
.venv/bin/mvmctl run examples/hello --attached
