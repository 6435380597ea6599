#!/usr/bin/env bash
# Set up, then run every test: unit tests and integration tests that build images and boot
# them under QEMU for real. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# What only the tests need, installed in one apt run: dockerd for the docker backend's tests
# (the fixtures start their own) and qemu-system-aarch64 for the aarch64 guest's. (setup.sh
# installed the compiler for mvm's own kernel, which the tests build once per run into their
# MVM_HOME before the first boot: about 5 minutes on two cores.)
needs=()
for need in dockerd:docker.io qemu-system-aarch64:qemu-system-arm; do
    command -v "${need%%:*}" >/dev/null || needs+=("${need#*:}")
done
if [ "${#needs[@]}" -gt 0 ]; then
    echo "==> installing ${needs[*]} (apt) for the tests"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${needs[@]}" </dev/null
fi
set +e
.venv/bin/pytest -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; that is a broken suite, not a pass" >&2
    exit 1
fi
exit "$status"
