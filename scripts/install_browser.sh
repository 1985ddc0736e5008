#!/usr/bin/env bash
# Install Debian's headless-capable Chromium and its matching chromedriver for the
# TensorBoard end-to-end test (tests/test_tensorboard_e2e.py) and scripts/screenshots.py.
# Idempotent: does nothing when /usr/bin/chromium and /usr/bin/chromedriver both exist.
# Only apt is used: no tool is allowed to download a browser or driver by itself.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; then
    echo "install_browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) and" \
         "$("$CHROMEDRIVER" --version 2>/dev/null | cut -d' ' -f1-2 || echo chromedriver)" \
         "are already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: error: apt-get not found; install chromium and chromium-driver" \
         "(providing $CHROMIUM and $CHROMEDRIVER) with your system's package manager" >&2
    exit 1
fi

if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo)
else
    echo "install_browser: error: installing chromium needs root; run as root or with" \
         "sudo: sudo apt-get update && sudo apt-get install -y --no-install-recommends" \
         "chromium chromium-driver" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends chromium chromium-driver

for f in "$CHROMIUM" "$CHROMEDRIVER"; do
    if [[ ! -x "$f" ]]; then
        echo "install_browser: error: $f is still missing after apt-get install" >&2
        exit 1
    fi
done
echo "install_browser: installed $("$CHROMIUM" --version) and $("$CHROMEDRIVER" --version | cut -d' ' -f1-2)"
