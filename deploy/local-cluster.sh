#!/usr/bin/env bash
# A 3-replica broker cluster on this machine: three nats-server processes (JetStream,
# one cluster, on loopback) and three `broker serve` replicas on them, listening on
# 127.0.0.1:8081, :8082 and :8083. Ctrl-C stops everything; data lives in a temporary
# directory that goes with it.
#
#   cargo build --release -p broker-cli && deploy/local-cluster.sh
#
# Needs nats-server (Debian: apt-get install nats-server). BROKER_BIN overrides the
# binary (default: target/release/broker).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${BROKER_BIN:-target/release/broker}"
[ -x "$bin" ] || { echo "build the broker first: cargo build --release -p broker-cli" >&2; exit 1; }
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] \
  || { echo "nats-server is not installed (Debian: apt-get install nats-server)" >&2; exit 1; }
nats="$(command -v nats-server || echo /usr/sbin/nats-server)"
dir="$(mktemp -d)"
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap stop EXIT INT TERM

client=(14222 14223 14224)
route=(16222 16223 16224)
for i in 0 1 2; do
  routes=()
  for j in 0 1 2; do [ "$j" = "$i" ] || routes+=("nats://127.0.0.1:${route[$j]}"); done
  "$nats" -a 127.0.0.1 -p "${client[$i]}" -js -sd "$dir/nats$i" -n "nats$i" \
    --cluster_name broker-local --cluster "nats://127.0.0.1:${route[$i]}" \
    --routes "$(IFS=,; echo "${routes[*]}")" >"$dir/nats$i.log" 2>&1 &
  pids+=($!)
done

urls="nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"
# The built-in example config, on NATS, each replica on its own port.
"$bin" config example | sed "s#^url = \"sqlite://./data/broker.db\"#url = \"$urls\"#" >"$dir/broker.toml"
for i in 0 1 2; do
  port=$((8081 + i))
  BROKER__SERVER__LISTEN="127.0.0.1:$port" "$bin" serve --config "$dir/broker.toml" \
    2>"$dir/broker$i.log" | sed -u "s/^/replica $((i + 1)): /" &
  pids+=($!)
done
echo "3 replicas on http://127.0.0.1:8081, :8082, :8083 (logs in $dir); Ctrl-C stops them"
wait
