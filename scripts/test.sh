#!/usr/bin/env bash
# Set up, then run every test: unit tests and integration tests that build images and boot
# them under QEMU for real. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The docker backend's tests run against a real dockerd; the fixtures start their own.
if ! command -v dockerd >/dev/null; then
    echo "==> installing docker.io (apt) for the docker backend's tests"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends docker.io </dev/null
fi
# The aarch64 guest's tests boot it under qemu-system-aarch64 (emulated; only they need it).
if ! command -v qemu-system-aarch64 >/dev/null; then
    echo "==> installing qemu-system-arm (apt) for the aarch64 guest's tests"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends qemu-system-arm </dev/null
fi
# The tests of mvm's own kernel compile it once per run (about 5 minutes on two cores).
kernel_needs=()
for need in gcc:gcc make:make flex:flex bison:bison bc:bc /usr/include/gelf.h:libelf-dev; do
    what=${need%%:*}
    if [ "${what#/}" != "$what" ]; then [ -e "$what" ] || kernel_needs+=("${need#*:}")
    else command -v "$what" >/dev/null || kernel_needs+=("${need#*:}"); fi
done
if [ "${#kernel_needs[@]}" -gt 0 ]; then
    echo "==> installing ${kernel_needs[*]} (apt) to compile mvm's own kernel in its tests"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${kernel_needs[@]}" </dev/null
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
