#!/usr/bin/env bash
# What pyengine needs from the system:
#  - a WebGPU adapter for the native backend: on a machine without a GPU driver this is
#    lavapipe, Mesa's Vulkan on the CPU (Debian/Ubuntu package mesa-vulkan-drivers);
#  - Chromium, for the browser backend and its tests (WebGPU on SwiftShader when there is no GPU);
#  - Node.js's npm, which the build uses to fetch Pyodide from the npm registry.
set -euo pipefail

have_vulkan_icd() {
    ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1 \
        && ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'
}
have_chromium() {
    command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || [ -n "${PYENGINE_CHROMIUM:-}" ]
}

packages=()
have_vulkan_icd || packages+=(mesa-vulkan-drivers libvulkan1)
have_chromium || packages+=(chromium)
command -v npm >/dev/null 2>&1 || packages+=(npm)
[ ${#packages[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "please install: ${packages[*]} (a Vulkan driver, Chromium, npm)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" != "0" ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
