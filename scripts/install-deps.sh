#!/usr/bin/env bash
# Installs what building and testing Shoal needs on a fresh Debian machine:
# Debian's mosquitto (reference external broker) and its clients (used by the tests),
# docker-registry (a real OCI registry for the `oci://` tests), containerd and runc (the
# container runtime tests run a private containerd), busybox-static (the test image's only
# binary), protobuf-compiler (containerd-client generates its gRPC code at build time),
# iproute2 and python3 (the multi-host tests build network namespaces with `ip` and probe
# multicast with python3), the cross toolchains and qemu-user for the ARM agent builds
# (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf and their C libraries link them; qemu-user
# runs them in the tests), Debian's chromium and its chromedriver (the dashboard test drives
# a headless browser over WebDriver), etcd-server (the hub's etcd store is tested against a real
# etcd), and the rustup targets for the example WASM modules and the ARM
# agents. Idempotent and quiet when done already.
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ -x /usr/bin/docker-registry ] || need+=(docker-registry)
[ -x /usr/bin/containerd ] || need+=(containerd)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need+=(runc)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# paho-mqtt: the third-party MQTT client tests/tests/mqtt_protocol.rs holds both brokers to.
/usr/bin/python3 -c 'import paho.mqtt.client' >/dev/null 2>&1 || need+=(python3-paho-mqtt)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || need+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
command -v qemu-aarch64 >/dev/null 2>&1 && command -v qemu-arm >/dev/null 2>&1 || need+=(qemu-user)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
[ -x /usr/bin/etcd ] || need+=(etcd-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing apt packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts mosquitto, docker-registry and containerd as services on install (where
# systemd runs); the tests run their own on private ports and sockets.
installed=$(rustup target list --installed)
for t in wasm32-wasip1 wasm32-wasip2 aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
for c in rustfmt clippy; do
  rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done
