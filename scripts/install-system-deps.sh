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

# PYENGINE_LAVAPIPE=backports: on Debian 12, lavapipe from bookworm-backports (Mesa 25) instead of
# Mesa 22.3, which reads storage several times slower on CPUs without AVX-512 but compiles kernels faster
# (README.md, Benchmarks).
backports=()
if [ "${PYENGINE_LAVAPIPE:-}" = backports ]; then
    if ! grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
        echo "PYENGINE_LAVAPIPE=backports is for Debian 12 (bookworm)" >&2
        exit 1
    fi
    backports=(mesa-vulkan-drivers)
fi

packages=()
have_vulkan_icd || packages+=(mesa-vulkan-drivers libvulkan1)
have_chromium || packages+=(chromium)
command -v npm >/dev/null 2>&1 || packages+=(npm)
[ ${#packages[@]} -eq 0 ] && [ ${#backports[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "please install: ${packages[*]} (a Vulkan driver, Chromium, npm)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" != "0" ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
if [ ${#backports[@]} -gt 0 ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "adding Debian's bookworm-backports to apt's sources" >&2
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' 'Components: main' \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
fi
$SUDO apt-get update -qq
if [ ${#packages[@]} -gt 0 ]; then
    $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
fi
if [ ${#backports[@]} -gt 0 ]; then
    $SUDO apt-get install -y -qq -t bookworm-backports "${backports[@]}" >/dev/null
fi
