#!/usr/bin/env bash
# A WebGPU adapter for the native backend: on a machine with no GPU driver this is
# lavapipe, Mesa's Vulkan on the CPU (Debian/Ubuntu package mesa-vulkan-drivers).
set -euo pipefail

have_vulkan_icd() {
    ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1 \
        && ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'
}

if have_vulkan_icd; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install a Vulkan driver (on Linux without a GPU: Mesa's lavapipe) and the Vulkan loader" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
