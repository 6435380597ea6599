#!/usr/bin/env bash
# Set up, then run every test: unit tests and integration tests that build images and boot
# them under QEMU for real. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/pytest -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; that is a broken suite, not a pass" >&2
    exit 1
fi
exit "$status"
