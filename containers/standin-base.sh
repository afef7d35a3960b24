#!/usr/bin/env bash
# Stand-in for docker.io/library/python:3.11-slim where no container registry is reachable:
# Debian bookworm (minbase, Python 3.11 with venv) from the configured Debian mirror, imported
# into podman under the official image's name. Needs root and debootstrap. ~1 min.
#   standin-base.sh WORKDIR
set -euo pipefail
ROOTFS="$1/rootfs"
IMAGE=docker.io/library/python:3.11-slim
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

rm -rf "$ROOTFS"
debootstrap --variant=minbase --include=ca-certificates,python3-venv bookworm "$ROOTFS" "$MIRROR" \
  >"$1/debootstrap.log" 2>&1 || { echo "debootstrap failed, see $1/debootstrap.log" >&2; exit 1; }
# CAs the host added (e.g. a TLS-intercepting proxy in front of PyPI) are trusted inside too.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" /usr/sbin/update-ca-certificates >/dev/null 2>&1
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$ROOTFS/etc/pip.conf"
fi
# The official image has `python` on PATH; Debian's only `python3`.
ln -s python3 "$ROOTFS/usr/bin/python"
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/var/log/*.log
: >"$ROOTFS/etc/resolv.conf"
tar -C "$ROOTFS" --numeric-owner -c . | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE" --quiet >/dev/null
rm -rf "$ROOTFS"
echo "built stand-in $IMAGE (Debian bookworm, $(podman run --rm "$IMAGE" python3 --version))"
