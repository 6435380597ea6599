#!/usr/bin/env bash
# Set up mvm from a fresh clone on Debian/Ubuntu: Python venv, mvm itself, host tools.
# Safe to run again: every step is skipped when already done. Needs root or passwordless sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
export DEBIAN_FRONTEND=noninteractive

# The builder resolves guest packages from these lists too: stale ones name superseded
# versions that no longer download. Refresh them when missing or older than a day.
if command -v apt-get >/dev/null; then
    newest=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)
    if [ -z "$newest" ]; then
        echo "==> apt-get update (package lists missing or older than a day)"
        "${SUDO[@]}" apt-get update -qq
    fi
fi

need_apt=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v python3 >/dev/null || need_apt+=(python3)
# A compiler and friends for mvm's own guest kernel (`mvmctl kernel build`), the default once built.
for need in gcc:gcc make:make flex:flex bison:bison bc:bc xz:xz-utils /usr/include/gelf.h:libelf-dev; do
    what=${need%%:*}
    if [ "${what#/}" != "$what" ]; then [ -e "$what" ] || need_apt+=("${need#*:}")
    else command -v "$what" >/dev/null || need_apt+=("${need#*:}"); fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]} (apt)"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" </dev/null
fi

if [ ! -x .venv/bin/mvmctl ] || [ pyproject.toml -nt .venv/.installed ]; then
    echo "==> installing mvm into .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch .venv/.installed
fi
# An editable install leaves mvm's own modules uncompiled, and with PYTHONDONTWRITEBYTECODE
# set nothing ever writes their .pyc: every mvmctl would compile them again (~15 ms of each
# `mvmctl exec`). Python reads .pyc files whatever that variable says.
.venv/bin/python -m compileall -q src/mvm >/dev/null

echo "==> host tools (mvmctl bootstrap)"
.venv/bin/mvmctl bootstrap
