#!/usr/bin/env bash
# Cross-compile the kernel tests for aarch64 and run them under qemu-user with `-cpu max`, so the
# NEON, dotprod (sdot) and i8mm (smmla) tiers all execute. Installs what it needs if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
[ -d /usr/aarch64-linux-gnu/lib ] || need+=(libc6-dev-arm64-cross)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update
    $SUDO apt-get install -y "${need[@]}"
fi
rustup target add aarch64-unknown-linux-gnu

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu"

# Every level the emulated CPU reports (scalar, portable, neon, neon-dotprod, neon-i8mm) runs
# inside each test; `levels_and_env_lowering` prints them.
cargo test -j2 -p ferroq-kernels --target aarch64-unknown-linux-gnu "$@"
cargo test -j2 -p ferroq-kernels --target aarch64-unknown-linux-gnu --features check-kernels "$@"
