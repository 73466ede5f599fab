#!/usr/bin/env bash
# Build an emulated aarch64 "device" for `edgec bench --remote`: qemu-user running an aarch64 Python
# (Debian's own arm64 packages unpacked into a sysroot, no root filesystem image) with numpy and
# onnxruntime aarch64 wheels from the package index. Idempotent and cached: a second run only checks.
#
#   tools/arm64-device.sh [ROOT]        # default ROOT: .cache/arm64-device (gitignored)
#
# Writes ROOT/python (a wrapper that execs qemu-aarch64-static on the aarch64 python3.11; use it as a
# device's `python:` in a devices file, with `emulated: true`) and prints its facts.
# Needs: Debian (apt, dpkg), root for the first run (qemu-user-static and the arm64 architecture).
# onnxruntime 1.19.2: the newest aarch64 wheel that imports under qemu-aarch64 7.2 (1.31.1 segfaults
# at import; /work/shared/PLATFORM-NOTES.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(mkdir -p "${1:-.cache/arm64-device}" && cd "${1:-.cache/arm64-device}" && pwd)"
ORT_VERSION="${EDGEC_ARM_ORT:-1.19.2}"
NUMPY_SPEC="${EDGEC_ARM_NUMPY:-numpy>=1.26,<2.3}"
PY="${PYTHON:-python3}"
PKGS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libffi8 libssl3
libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 libgcc-s1 libstdc++6 libcrypt1
libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1"

if ! command -v qemu-aarch64-static >/dev/null; then
  echo "installing qemu-user-static"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static >/dev/null
fi
if [ ! -x "$ROOT/sysroot/usr/bin/python3.11" ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -q >/dev/null
  fi
  mkdir -p "$ROOT/debs" "$ROOT/sysroot"
  (cd "$ROOT/debs" && for p in $PKGS; do ls "${p}"_*_arm64.deb >/dev/null 2>&1 || apt-get download -q "$p:arm64"; done)
  for deb in "$ROOT"/debs/*.deb; do dpkg -x "$deb" "$ROOT/sysroot"; done
fi
if [ ! -d "$ROOT/site/onnxruntime" ]; then
  "$PY" -m pip --version >/dev/null 2>&1 || { echo "error: $PY has no pip; set PYTHON=/path/to/a/python/with/pip" >&2; exit 2; }
  mkdir -p "$ROOT/wheels" "$ROOT/site"
  "$PY" -m pip download -q -d "$ROOT/wheels" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 311 --only-binary=:all: --no-deps \
    "onnxruntime==$ORT_VERSION" "$NUMPY_SPEC"
  for whl in "$ROOT"/wheels/*.whl; do "$PY" -m zipfile -e "$whl" "$ROOT/site"; done
fi
cat > "$ROOT/python" <<WRAP
#!/bin/sh
# an aarch64 Python 3.11 under qemu-user (built by tools/arm64-device.sh)
exec qemu-aarch64-static -cpu max -L "$ROOT/sysroot" -E PYTHONPATH="$ROOT/site" -U PYTHONHOME \
  "$ROOT/sysroot/usr/bin/python3.11" "\$@"
WRAP
chmod +x "$ROOT/python"
"$ROOT/python" -c "import platform, numpy, onnxruntime as o; print('arm64 device:', platform.machine(), 'python', platform.python_version(), 'numpy', numpy.__version__, 'onnxruntime', o.__version__)"
echo "python: $ROOT/python"
