#!/usr/bin/env bash
# Instructions per request in Fulcrum's own process, counted by callgrind:
# repeatable for the same binary and traffic whatever else the machine does
# (the load benchmark's CPU figures move ±3 % between runs of one binary).
# Counts user-space instructions only; the kernel's share is not in them.
#
#   benches/callgrind.sh [BIN ...]      # default target/release/fulcrum
#   DURATION=20 CONNS=8 POLICY=least-conn benches/callgrind.sh old/fulcrum new/fulcrum
#
# For each binary: nginx serves three backends, Fulcrum runs under
# `valgrind --tool=callgrind` with instrumentation off, wrk warms it up for 5 s,
# then instrumentation is on for DURATION seconds of wrk traffic. Prints
# requests, instructions and instructions per request, and keeps each profile
# (callgrind_annotate it to see where they go). Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-20}
CONNS=${CONNS:-8}
POLICY=${POLICY:-least-conn}
OUT=${OUT:-target/callgrind}
BINS=("$@"); [[ ${#BINS[@]} -gt 0 ]] || BINS=(target/release/fulcrum)
for tool in valgrind callgrind_control callgrind_annotate nginx wrk curl; do
  command -v $tool >/dev/null || { echo "callgrind.sh needs $tool (apt install valgrind nginx wrk curl)" >&2; exit 1; }
done
mkdir -p "$OUT"; W=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P=$(port); B1=$(port); B2=$(port); B3=$(port)
cat > "$W/nginx.conf" <<NG
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/nginx-error.log warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$B1; location / { return 200 "hello\n"; } }
  server { listen 127.0.0.1:$B2; location / { return 200 "hello\n"; } }
  server { listen 127.0.0.1:$B3; location / { return 200 "hello\n"; } } }
NG
cat > "$W/fulcrum.toml" <<FT
[server]
listen = "127.0.0.1:$P"
workers = 1
[pools.web]
policy = "$POLICY"
backends = ["127.0.0.1:$B1", "127.0.0.1:$B2", "127.0.0.1:$B3"]
FT
nginx -c "$W/nginx.conf" & PIDS+=($!)
echo "| binary | requests | instructions | instructions per request |"
echo "| --- | --- | --- | --- |"
for i in "${!BINS[@]}"; do
  bin=${BINS[$i]}; profile="$OUT/fulcrum-$i.callgrind"
  rm -f "$profile"*
  RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$profile" \
    "$bin" run --config "$W/fulcrum.toml" 2>"$W/valgrind-$i.log" & vg=$!; PIDS+=($vg)
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$P/" && break; sleep 0.5; done
  wrk -t1 -c"$CONNS" -d5s "http://127.0.0.1:$P/" >/dev/null
  callgrind_control -i on $vg >/dev/null 2>&1
  wrk -t1 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$P/" > "$W/wrk-$i.txt"
  callgrind_control -i off $vg >/dev/null 2>&1
  callgrind_control -d $vg >/dev/null 2>&1
  sleep 1
  kill $vg; wait $vg 2>/dev/null || true
  requests=$(grep -oE '^ *[0-9]+ requests' "$W/wrk-$i.txt" | awk '{print $1}')
  total=$(callgrind_annotate "$profile.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",","",$1); print $1; done=1}')
  echo "| $bin | $requests | $total | $((total / requests)) |"
done
echo
echo "profiles: $OUT/fulcrum-N.callgrind.1 (callgrind_annotate --inclusive=yes FILE | head -60)"
