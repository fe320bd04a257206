#!/usr/bin/env bash
# gRPC load benchmark: Fulcrum against nginx (grpc_pass) and HAProxy (proto h2) proxying
# gRPC-shaped unary calls over cleartext HTTP/2 (h2c) in and out, to the same three h2c backends,
# in one run, interleaved.
#
#   benches/grpc.sh                  # REPEAT=3 runs, 10 s each, 16 connections × 10 streams
#   REPEAT=1 DURATION=3 benches/grpc.sh
#   FULCRUM_BIN=/path/to/fulcrum benches/grpc.sh
#
# The backends are nginx answering every POST with one empty gRPC message and `grpc-status: 0`
# in the trailers (add_trailer). Client: h2load, POSTing a 5-byte gRPC frame with
# `content-type: application/grpc` and `te: trailers`. Every proxy: one worker (thread) pinned to
# core 1 (h2load and the backends on core 0); nginx keeps up to 256 idle upstream connections (it
# sends one stream per connection), HAProxy and Fulcrum share HTTP/2 connections to the backends. Prints every run and the medians: req/s, CPU µs per request,
# each ÷ nginx. Installs nginx, haproxy and h2load (nghttp2-client) when missing. Traffic stays on
# 127.0.0.1; every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh

DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-16}

need=()
for tool in nginx haproxy h2load taskset python3; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  echo "installing: nginx haproxy nghttp2-client" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq nginx haproxy nghttp2-client util-linux >/dev/null
fi
PATH=$PATH:/usr/sbin
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

[[ -n "${FULCRUM_BIN:-}" ]] || cargo build --release --bin fulcrum >&2
FULCRUM=${FULCRUM_BIN:-$PWD/target/release/fulcrum}

WORK=$(mktemp -d /tmp/fulcrum-grpc.XXXXXX)
PIDS=()
trap cleanup EXIT INT TERM

B1=19301 B2=19302 B3=19303 P_FULCRUM=18380 P_NGINX=18381 P_HAPROXY=18382
for port in $B1 $B2 $B3 $P_FULCRUM $P_NGINX $P_HAPROXY; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use: stop whatever listens there first" >&2; exit 1
  fi
done

# One gRPC message: not compressed, length 0.
printf '\0\0\0\0\0' > "$WORK/call.bin"

mkdir -p "$WORK/backends" "$WORK/nginx"
backend() {
  echo "server { listen 127.0.0.1:$1 http2 reuseport backlog=4096; location / {
    default_type application/grpc; add_trailer grpc-status 0; add_trailer grpc-message \"\";
    return 200 \"\\\\x00\\\\x00\\\\x00\\\\x00\\\\x00\"; } }"
}
cat > "$WORK/backends/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/backends/nginx.pid;
error_log $WORK/backends/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  $(backend $B1)
  $(backend $B2)
  $(backend $B3)
}
EOF

cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backends {
    least_conn;
    # max_fails=0: nginx's gRPC proxy reads a frame for a stream it has closed (the backends
    # answer without reading the request body) as an upstream error, and would mark backends
    # down for 10 s; the few such requests are counted as failed instead.
    server 127.0.0.1:$B1 max_fails=0; server 127.0.0.1:$B2 max_fails=0; server 127.0.0.1:$B3 max_fails=0;
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$P_NGINX http2 backlog=4096;
    location / { grpc_pass grpc://backends; grpc_set_header X-Forwarded-For \$remote_addr; }
  }
}
EOF

cat > "$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 9900
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY proto h2
  option forwardfor
  default_backend be
backend be
  balance leastconn
  server b1 127.0.0.1:$B1 proto h2
  server b2 127.0.0.1:$B2 proto h2
  server b3 127.0.0.1:$B3 proto h2
EOF

cat > "$WORK/fulcrum.toml" <<EOF
[server]
listen = "127.0.0.1:$P_FULCRUM"
workers = 1
[pools.grpc]
policy = "least-conn"
protocol = "h2c"
backends = ["127.0.0.1:$B1", "127.0.0.1:$B2", "127.0.0.1:$B3"]
EOF

taskset -c 0 nginx -c "$WORK/backends/nginx.conf" & PIDS+=($!)
wait_port $B1
taskset -c 1 nginx -c "$WORK/nginx/nginx.conf" & PIDS+=($!); NGINX=$!
taskset -c 1 haproxy -f "$WORK/haproxy.cfg" -db & PIDS+=($!); HAPROXY=$!
RUST_LOG=warn taskset -c 1 "$FULCRUM" run --config "$WORK/fulcrum.toml" & PIDS+=($!); FULCRUM_PID=$!
wait_port $P_NGINX; wait_port $P_HAPROXY; wait_port $P_FULCRUM
sleep 0.5
declare -A PORT=([nginx]=$P_NGINX [haproxy]=$P_HAPROXY [fulcrum]=$P_FULCRUM)
declare -A PID=([nginx]=$NGINX [haproxy]=$HAPROXY [fulcrum]=$FULCRUM_PID)
PROXIES="nginx haproxy fulcrum"

# A call through each proxy must come back with grpc-status 0, or the figures mean nothing.
for proxy in $PROXIES; do
  if ! h2load -n1 -c1 -d "$WORK/call.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
      "http://127.0.0.1:${PORT[$proxy]}/test.Echo/Unary" 2>&1 | grep -q "status codes: 1 2xx"; then
    echo "a call through $proxy failed" >&2; exit 1
  fi
done

run() {  # $1 proxy: prints "req/s cpu_us_per_req"
  local port=${PORT[$1]} pid=${PID[$1]} out before after requests rps failed
  local url="http://127.0.0.1:$port/test.Echo/Unary"
  local args=(-c"$CONNS" -m10 -t1 -d "$WORK/call.bin" -H 'content-type: application/grpc' -H 'te: trailers')
  taskset -c 0 h2load "${args[@]}" -D1 "$url" >/dev/null 2>&1 || true
  before=$(cpu_ticks "$pid")
  out=$(taskset -c 0 h2load "${args[@]}" -D"$DURATION" "$url")
  after=$(cpu_ticks "$pid")
  requests=$(awk '/^requests:/{print $8}' <<<"$out")
  failed=$(awk '/^requests:/{print $10}' <<<"$out")
  if [[ "${failed:-0}" != 0 ]]; then
    echo "  ($1: $failed failed)" >&2
    [[ $1 == nginx ]] && grep -v "no live upstreams" "$WORK/nginx/error.log" | tail -n 3 >&2
  fi
  rps=$(awk '/^finished in/{gsub(",", "", $4); print $4}' <<<"$out")
  awk -v r="$rps" -v t=$((after - before)) -v hz="$HZ" -v n="${requests:-0}" \
    'BEGIN{printf "%s %.1f\n", r, n ? t * 1e6 / hz / n : 0}'
}

echo "# gRPC unary over h2c, Fulcrum, nginx (grpc_pass) and HAProxy (proto h2) — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, 1 worker each pinned to core 1, $CONNS conns × 10 streams, ${DURATION}s per run, $REPEAT runs interleaved"
echo "# nginx $(nginx -v 2>&1 | sed 's/.*\///'), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}'), $(h2load --version 2>&1 | head -1)"
echo
echo "| run | proxy | req/s | CPU µs/req |"
echo "| --- | --- | --- | --- |"
declare -A results=()
for i in $(seq "$REPEAT"); do
  order="nginx haproxy fulcrum"; ((i % 2 == 0)) && order="fulcrum haproxy nginx"
  for proxy in $order; do
    line=$(run "$proxy")
    results[$proxy]+="$line"$'\n'
    echo "| $i | $proxy | ${line// / | } |"
  done
done
median() { python3 -c 'import sys, statistics
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
print(" ".join("%g" % statistics.median(c) for c in zip(*rows)))'; }
echo
echo "| proxy | req/s | CPU µs/req | req/s ÷ nginx | CPU ÷ nginx |"
echo "| --- | --- | --- | --- | --- |"
read -r n_rps n_cpu <<<"$(median <<<"${results[nginx]}")"
for proxy in $PROXIES; do
  read -r rps cpu <<<"$(median <<<"${results[$proxy]}")"
  awk -v proxy="$proxy" -v rps="$rps" -v cpu="$cpu" -v nr="$n_rps" -v nc="$n_cpu" \
    'BEGIN{printf "| %s | %.0f | %s | %.2f | %.2f |\n", proxy, rps, cpu, nr ? rps/nr : 0, nc ? cpu/nc : 0}'
done
