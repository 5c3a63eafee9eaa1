#!/usr/bin/env bash
# The one test command (README, .ci/run): install what the tests need, then lint, type-check and test.
# Idempotent: apt-get and npm run only when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(chromium prometheus docker-compose nodejs npm redis-server)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# nodejs/npm may come from outside Debian (the image ships its own node); only ask apt when absent.
if command -v node >/dev/null && command -v npm >/dev/null; then
    filtered=()
    for pkg in "${missing[@]}"; do [[ $pkg == nodejs || $pkg == npm ]] || filtered+=("$pkg"); done
    missing=("${filtered[@]}")
fi
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'

if [[ -f tests/js/package.json ]]; then
    (cd tests/js && { [[ -d node_modules ]] || npm install --no-audit --no-fund --silent; })
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
