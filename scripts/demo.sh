#!/usr/bin/env bash
# Set up, build mvm's own guest kernel (once), then build the default image (examples/hello),
# boot it and show what it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> mvmctl kernel build (mvm's own guest kernel: about 5 minutes on two cores, once; cached)"
if ! .venv/bin/mvmctl kernel build; then
    echo "==> (no kernel of our own: images boot Debian's cloud kernel instead, a little slower)"
fi
echo "==> mvmctl build examples/hello"
.venv/bin/mvmctl build examples/hello
echo "==> mvmctl run examples/hello --attached"
.venv/bin/mvmctl run examples/hello --attached
