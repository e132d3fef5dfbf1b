#!/usr/bin/env bash
# Headless Chromium + its matching WebDriver (Debian packages) and Selenium, for tests/test_serve.py's web-page
# test. Without them that one test skips; CI runs this first so it does not. Safe to run twice.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

# Selenium talks to the Debian chromedriver directly (tests pass its path), so Selenium Manager never downloads.
python3 -c "import selenium" 2>/dev/null || python3 -m pip install -q "selenium>=4.10"

chromium --version
chromedriver --version
