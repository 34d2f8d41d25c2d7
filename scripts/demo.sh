#!/usr/bin/env bash
# The main job: build the site, then, on a machine with no display, print one answer
# streamed from the model running in headless Chromium; with a display, serve the demo page.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
$BIN/python build/build.py
if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    echo "Answer from the model running in headless Chromium (WebGPU), streamed:"
    $BIN/pyengine generate --backend browser --temperature 0 --stats "What is the capital of France?"
    echo "To chat in a browser: $BIN/pyengine serve  (then open the URL it prints)"
else
    exec $BIN/pyengine serve
fi
