#!/usr/bin/env bash
# The Debian packages the tests need, installed with apt-get (as root, or through sudo):
#   fluidsynth and General MIDI soundfonts   the version corpus and its tests
#   prometheus                               promtool checks the Prometheus configuration and
#                                            alert rules
#   chromium, chromium-driver                the console's browser test (and docs/screenshot.py)
#   docker.io, debootstrap                   the container image's test
# Tests that need a missing one skip and say so. Without apt-get this does nothing.
#
#   bash docs/system-packages.sh           install them
#   bash docs/system-packages.sh --list    print their names, one a line
set -euo pipefail

PACKAGES=(
    fluidsynth fluid-soundfont-gm timgm6mb-soundfont fluidr3mono-gm-soundfont
    musescore-general-soundfont-small prometheus chromium chromium-driver
    docker.io debootstrap
)

if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "${PACKAGES[@]}"
    exit 0
fi

if command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        "${PACKAGES[@]}"
fi
