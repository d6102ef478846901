#!/usr/bin/env bash
# Try a lanmesh cluster on one machine: three core nodes on loopback, with
# certificates minted by `pki`, formed with --bootstrap-expect, and one edge
# (edge-1) linked to them.
#
#   deploy/local-cluster.sh start     # build if needed, mint certs, start 3 cores and the edge
#   deploy/local-cluster.sh status    # the cluster as node-2 sees it, and the edge
#   deploy/local-cluster.sh stop      # SIGTERM everything (the leader hands over first)
#   deploy/local-cluster.sh clean     # stop and delete the data
#
# Environment: LANMESH_LOCAL_DIR (default ./lanmesh-local), LANMESH_BASE_PORT
# (default 11000: node N uses BASE+1000*(N-1) for its API, +1 Raft, +2 client;
# the edge BASE+3000 for HTTP status and +2 client), LANMESH_BIN_DIR
# (default: target/release, else target/debug, else build).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${LANMESH_LOCAL_DIR:-$PWD/lanmesh-local}
base=${LANMESH_BASE_PORT:-11000}
cluster=local

port() { echo $((base + 1000 * ($1 - 1) + $2)); }

find_bins() {
  if [ -n "${LANMESH_BIN_DIR:-}" ]; then
    bin=$LANMESH_BIN_DIR
    return
  fi
  for profile in release debug; do
    if [ -x "$root/target/$profile/core-node" ] && [ -x "$root/target/$profile/pki" ] \
      && [ -x "$root/target/$profile/edge-node" ]; then
      bin="$root/target/$profile"
      return
    fi
  done
  echo "building core-node, edge-node and pki (first time only, a minute or two)..."
  (cd "$root" && cargo build -q --locked -p core-node -p edge-node -p pki)
  bin="$root/target/debug"
}

# pid_of / running take a process name: node-1..node-3 or edge-1.
pid_of() {
  local f="$dir/$1/node.json"
  [ -f "$f" ] && grep -o '"pid":[0-9]*' "$f" | cut -d: -f2
}

running() {
  local pid
  pid=$(pid_of "$1") || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

start() {
  find_bins
  mkdir -p "$dir"
  if [ ! -f "$dir/ca/ca.crt" ]; then
    "$bin/pki" init --cluster-id "$cluster" --out "$dir/ca" >/dev/null
    for n in 1 2 3; do
      "$bin/pki" issue core --name "node-$n" --ip 127.0.0.1 --ca-dir "$dir/ca" --out "$dir/certs" >/dev/null
    done
    "$bin/pki" issue edge --name edge-1 --ip 127.0.0.1 --ca-dir "$dir/ca" --out "$dir/certs" >/dev/null
    echo "minted a CA, three node certificates and an edge certificate in $dir"
  fi
  for n in 1 2 3; do
    if running "node-$n"; then
      echo "node-$n already running"
      continue
    fi
    peers=""
    for p in 1 2 3; do
      [ "$p" != "$n" ] && peers="$peers${peers:+,}127.0.0.1:$(port "$p" 0)"
    done
    rm -f "$dir/node-$n/node.json"
    nohup "$bin/core-node" run --node-id "node-$n" --cluster-id "$cluster" --data-dir "$dir/node-$n" \
      --api-addr "127.0.0.1:$(port "$n" 0)" --raft-addr "127.0.0.1:$(port "$n" 1)" \
      --client-addr "127.0.0.1:$(port "$n" 2)" --peers "$peers" --bootstrap-expect 3 \
      --ca "$dir/certs/ca.crt" --cert "$dir/certs/node-$n.crt" --key "$dir/certs/node-$n.key" \
      >>"$dir/node-$n.log" 2>&1 &
  done
  echo -n "waiting for a leader"
  for _ in $(seq 1 150); do
    if "$bin/core-node" status --json --api "http://127.0.0.1:$(port 2 0)" 2>/dev/null | grep -q '"leader_id": *"node-'; then
      echo
      "$bin/core-node" status --api "http://127.0.0.1:$(port 2 0)"
      start_edge
      echo
      echo "try:  $bin/core-node kv put hello world --api http://127.0.0.1:$(port 1 0)"
      echo "      $bin/core-node kv get hello --api http://127.0.0.1:$(port 3 0)"
      echo "      $bin/edge-node status --http http://127.0.0.1:$(port 4 0)"
      echo "      (clients: --ca $dir/certs/ca.crt, --server 127.0.0.1:$(port 4 2) for the edge)"
      echo "logs: $dir/{node-1,node-2,node-3,edge-1}.log    stop: $0 stop"
      return 0
    fi
    echo -n .
    sleep 0.2
  done
  echo
  echo "no leader after 30 s; see $dir/node-*.log" >&2
  return 1
}

start_edge() {
  if running edge-1; then
    echo "edge-1 already running"
    return 0
  fi
  rm -f "$dir/edge-1/node.json"
  nohup "$bin/edge-node" run --node-id edge-1 --cluster-id "$cluster" --data-dir "$dir/edge-1" \
    --client-addr "127.0.0.1:$(port 4 2)" --http-addr "127.0.0.1:$(port 4 0)" \
    --upstream "127.0.0.1:$(port 1 2),127.0.0.1:$(port 2 2),127.0.0.1:$(port 3 2)" \
    --ca "$dir/certs/ca.crt" --cert "$dir/certs/edge-1.crt" --key "$dir/certs/edge-1.key" \
    >>"$dir/edge-1.log" 2>&1 &
  for _ in $(seq 1 100); do
    if "$bin/edge-node" status --http "http://127.0.0.1:$(port 4 0)" 2>/dev/null | grep -q '^upstream    node-'; then
      echo
      "$bin/edge-node" status --http "http://127.0.0.1:$(port 4 0)"
      return 0
    fi
    sleep 0.2
  done
  echo "edge-1 did not link to a core within 20 s; see $dir/edge-1.log" >&2
}

stop() {
  local any=0
  for n in node-1 node-2 node-3 edge-1; do
    if running "$n"; then
      kill -TERM "$(pid_of "$n")" && any=1
    fi
  done
  for _ in $(seq 1 100); do
    if ! running node-1 && ! running node-2 && ! running node-3 && ! running edge-1; then
      [ "$any" = 1 ] && echo "stopped"
      return 0
    fi
    sleep 0.2
  done
  echo "some nodes did not stop within 20 s" >&2
  return 1
}

status() {
  find_bins
  "$bin/core-node" status --api "http://127.0.0.1:$(port 2 0)"
  echo
  "$bin/edge-node" status --http "http://127.0.0.1:$(port 4 0)" || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  clean) stop; rm -rf "$dir"; echo "removed $dir" ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
