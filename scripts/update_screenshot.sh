#!/usr/bin/env bash
# Refresh docs/screenshot.png, the README's picture of the live page, from the browser test that
# drives the page under traffic. That test always writes tests/artifacts/page.png; it copies it over
# the tracked file only with BROKER_UPDATE_SCREENSHOT=1, so `make test` never dirties a checkout.
# Look at the image, then commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
BROKER_UPDATE_SCREENSHOT=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/clients/test_browser.py::test_page_subscribes_publishes_and_shows_live_figures
git status --short docs/screenshot.png
