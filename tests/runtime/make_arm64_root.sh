#!/bin/sh
# An arm64 Debian root (bookworm, minbase + python3) in which tests run aarch64 packages under
# qemu (tests/runtime/test_package_emulated.py). Needs root, debootstrap and qemu-user-static;
# the second stage runs arm64 binaries in a chroot, through binfmt_misc.
#   usage: make_arm64_root.sh ROOT
set -eu
root=${1:?usage: make_arm64_root.sh ROOT}
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  [ -e /proc/sys/fs/binfmt_misc/register ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64
fi
debootstrap --arch=arm64 --variant=minbase --foreign --include=python3,libstdc++6 bookworm "$root"
# The binfmt entry names its interpreter by path, which a chroot resolves inside the root.
mkdir -p "$root/usr/libexec/qemu-binfmt"
cp /usr/bin/qemu-aarch64-static "$root/usr/bin/"
ln -sf ../../bin/qemu-aarch64-static "$root/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
chroot "$root" /debootstrap/debootstrap --second-stage
