#!/usr/bin/env bash
# Set up a fresh Debian machine for blkrep: the peers the tests and benchmarks run against
# (qemu-utils, nbdkit, libnbd-bin, fio, groff for the man-page check; etcd-server and etcd-client
# for the lease tests, which start their own etcd on tmpfs and free ports, never the packaged
# service; nftables for partition rules; tmux, ansible-core, systemd-analyze and openssl for the
# setup wizard's tests), the npm dependencies, the native addon and the TypeScript build. Safe to
# run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for pair in qemu-utils:qemu-img qemu-utils:qemu-io qemu-utils:qemu-nbd nbdkit:nbdkit libnbd-bin:nbdinfo libnbd-bin:nbdcopy fio:fio groff-base:groff spin:spin tmux:tmux etcd-server:etcd etcd-client:etcdctl nftables:nft ansible-core:ansible-playbook systemd:systemd-analyze openssl:openssl; do
  command -v "${pair#*:}" >/dev/null 2>&1 || missing+=("${pair%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm install, not npm ci: the registry here serves only some platforms' optional packages
# (rollup, esbuild), which npm ci counts as a lock-file mismatch.
npm install --no-audit --no-fund
npm run build
