#!/usr/bin/env bash
# Make sure this (Debian) control machine has what the lab and tests need: Debian's docker.io engine
# running, debootstrap (lab images), qemu and e2fsprogs (the lab's VM hosts), skopeo and
# docker-registry (the real client and the CNCF reference registry), htpasswd, an ssh client.
# Idempotent; run as root.
set -euo pipefail

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v skopeo >/dev/null || need+=(skopeo)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v openssl >/dev/null || need+=(openssl)
command -v ssh >/dev/null || need+=(openssh-client)
command -v findmnt >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "--> Installing ${need[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
  echo "--> Docker engine: running ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"
  exit 0
fi

if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  systemctl start docker
else
  echo "--> Starting dockerd in the background (no systemd here); log: /var/log/dockyard-dockerd.log"
  setsid nohup dockerd >>/var/log/dockyard-dockerd.log 2>&1 </dev/null &
fi
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo "--> Docker engine: running ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"
    exit 0
  fi
  sleep 1
done
echo "dockyard: the Docker engine did not start; see /var/log/dockyard-dockerd.log" >&2
tail -n 20 /var/log/dockyard-dockerd.log >&2 || true
exit 1
