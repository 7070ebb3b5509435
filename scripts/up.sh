#!/usr/bin/env bash
# The all-in-one node: builds Shoal, starts a hub (with its embedded MQTT broker) and a local
# edge agent, applies examples/hello-fleet.yaml, and shows the fleet converging until every
# replica runs; then follows the workloads' output until Ctrl-C, and stops both processes.
# The agent is given no broker address, only a one-time join token: it finds the hub over
# mDNS on loopback, the way a device on a LAN finds it (nothing is advertised beyond this
# machine), enrolls, and from then on speaks TLS with its own certificate. `shoal` uses the
# operator bundle the hub wrote (.shoal/hub/operator).
#
#   scripts/up.sh [MANIFEST]      state lives in .shoal/ (delete it to start afresh)
#
# Ports: MQTT over TLS 127.0.0.1:8883, HTTPS 127.0.0.1:8080 (override with SHOAL_MQTT_PORT /
# SHOAL_HTTP_PORT).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
manifest="${1:-examples/hello-fleet.yaml}"
mqtt_port="${SHOAL_MQTT_PORT:-8883}"
http_port="${SHOAL_HTTP_PORT:-8080}"
state="$REPO_ROOT/.shoal"

scripts/install-deps.sh
echo "== building (first build takes a few minutes)"
scripts/build-modules.sh
cargo build --workspace -q --bins
bin="$CARGO_TARGET_DIR/debug"
export SHOAL_BROKER="mqtts://127.0.0.1:$mqtt_port" SHOAL_HUB="https://127.0.0.1:$http_port" \
  SHOAL_CREDENTIALS="$state/hub/operator"

mkdir -p "$state"
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo; echo "== stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$bin/shoal-hub" serve --data-dir "$state/hub" --mqtt-listen "127.0.0.1:$mqtt_port" \
  --http-listen "127.0.0.1:$http_port" --mdns-interface lo >"$state/hub.log" 2>&1 &
hub_pid=$!
pids+=("$hub_pid")
for _ in $(seq 100); do "$bin/shoal" get devices >/dev/null 2>&1 && break; sleep 0.1; done
if ! kill -0 "$hub_pid" 2>/dev/null; then
  echo "shoal-hub did not start (is port $mqtt_port or $http_port taken, e.g. by a mosquitto service?" \
       "set SHOAL_MQTT_PORT / SHOAL_HTTP_PORT):"
  cat "$state/hub.log"
  exit 1
fi
# The token grants the labels (placement selects on the operator's labels only).
token=$("$bin/shoal-hub" token create --data-dir "$state/hub" --ttl 10m --labels role=sensor,zone=local)
SHOAL_AGENT_JOIN_TOKEN="$token" "$bin/shoal-agent" run --data-dir "$state/agent" --device-id "$(hostname -s | tr 'A-Z_.' 'a-z--' | cut -c1-63)" \
  --mdns-interface lo --socket "$state/agent.sock" \
  >"$state/agent.log" 2>&1 &
pids+=($!)
echo "== hub: $SHOAL_HUB (log .shoal/hub.log), broker: $SHOAL_BROKER, agent log: .shoal/agent.log"
echo "   operator credentials: SHOAL_CREDENTIALS=$SHOAL_CREDENTIALS (also for mosquitto_pub --cafile/--cert/--key)"
echo "   the agent finds the hub over mDNS; see: $bin/shoal-agent peers --socket .shoal/agent.sock"

for _ in $(seq 100); do
  [ "$("$bin/shoal" get devices -o json 2>/dev/null | grep -c '"online": true')" -ge 1 ] && break; sleep 0.1
done
echo "== applying $manifest"
"$bin/shoal" apply -f "$manifest"

echo "== converging"
for i in $(seq 120); do
  clear 2>/dev/null || true
  echo "== fleet after ${i}s"; "$bin/shoal" get devices; echo; "$bin/shoal" get workloads
  json=$("$bin/shoal" get workloads -o json)
  if ! grep -qE '"phase": "(Pending|Pulling|Starting)"' <<<"$json"; then
    echo; echo "== all replicas placed and started"; break
  fi
  sleep 1
done

echo "== workload output (Ctrl-C to stop the node)"
tail -n 3 -F "$state"/agent/logs/*.log
