#!/usr/bin/env bash
# TLS load benchmark: Fulcrum against nginx terminating TLS for the same traffic to the same
# three backends on this machine, in one run, interleaved.
#
#   benches/tls.sh                  # REPEAT=3 runs per row, 10 s each, 16 connections
#   REPEAT=1 DURATION=2 IDLE=200 benches/tls.sh    # a quick look
#   CONNS=256 FULCRUM_BIN=/path/to/fulcrum benches/tls.sh
#
# Both proxies: one worker, pinned to core 1 (wrk, h2load and the backends on core 0); TLS 1.3
# with X25519, an ECDSA P-256 certificate made for the run; session resumption off (nginx:
# ssl_session_tickets off, ssl_session_cache off; Fulcrum: session_resumption = false), so the
# new-connection row makes a full handshake per request on both.
# Rows:
#   https-keepalive   wrk over HTTPS, keep-alive (HTTP/1.1)
#   https-new-conn    wrk over HTTPS with `Connection: close`: a TCP and TLS handshake per request
#   h2-tls            h2load over HTTP/2 with TLS (ALPN h2), 10 streams per connection
# then the memory of IDLE idle connections held over HTTPS and over HTTP/2 (benches/idle_conns.py).
# Prints every run and the medians: req/s, p99 (wrk rows), CPU µs per request ((utime+stime) ÷
# requests), and Fulcrum ÷ nginx. Installs nginx, wrk and h2load (nghttp2-client) with apt-get
# when missing. Every process it starts is stopped on exit. Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh

DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-16}
IDLE=${IDLE:-2000}

need=()
for tool in nginx wrk h2load openssl taskset python3; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  echo "installing: nginx wrk nghttp2-client openssl" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq nginx wrk nghttp2-client openssl util-linux >/dev/null
fi
PATH=$PATH:/usr/sbin
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

[[ -n "${FULCRUM_BIN:-}" ]] || cargo build --release --bin fulcrum >&2
FULCRUM=${FULCRUM_BIN:-$PWD/target/release/fulcrum}

WORK=$(mktemp -d /tmp/fulcrum-tls.XXXXXX)
PIDS=()
trap cleanup EXIT INT TERM

B1=19201 B2=19202 B3=19203 P_FULCRUM=18280 P_NGINX=18281
for port in $B1 $B2 $B3 $P_FULCRUM $P_NGINX; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use: stop whatever listens there first" >&2; exit 1
  fi
done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench.local -addext subjectAltName=DNS:bench.local \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

mkdir -p "$WORK/backends" "$WORK/nginx"
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
  server { listen 127.0.0.1:$B1 reuseport backlog=4096; location / { return 200 "hello\n"; } }
  server { listen 127.0.0.1:$B2 reuseport backlog=4096; location / { return 200 "hello\n"; } }
  server { listen 127.0.0.1:$B3 reuseport backlog=4096; location / { return 200 "hello\n"; } }
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
    server 127.0.0.1:$B1; server 127.0.0.1:$B2; server 127.0.0.1:$B3;
    keepalive 256;
  }
  server {
    listen 127.0.0.1:$P_NGINX ssl http2 backlog=4096;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.3;
    ssl_ecdh_curve X25519;
    ssl_session_tickets off;
    ssl_session_cache off;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
EOF

cat > "$WORK/fulcrum.toml" <<EOF
[server]
listen = "127.0.0.1:$P_FULCRUM"
workers = 1
header_read_timeout = "60s"
tls = { cert = "$WORK/cert.pem", key = "$WORK/key.pem", session_resumption = false }
[pools.web]
policy = "least-conn"
backends = ["127.0.0.1:$B1", "127.0.0.1:$B2", "127.0.0.1:$B3"]
EOF


taskset -c 0 nginx -c "$WORK/backends/nginx.conf" & PIDS+=($!)
wait_port $B1
declare -A PORT=([nginx]=$P_NGINX [fulcrum]=$P_FULCRUM) PID=()
# Starts the two proxies (again: fresh processes, so one row's freed memory is not the next's).
start_proxies() {
  local pid
  for pid in ${PID[nginx]:-} ${PID[fulcrum]:-}; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  while (exec 3<>"/dev/tcp/127.0.0.1/$P_NGINX") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$P_FULCRUM") 2>/dev/null; do sleep 0.05; done
  taskset -c 1 nginx -c "$WORK/nginx/nginx.conf" & PIDS+=($!); PID[nginx]=$!
  RUST_LOG=warn taskset -c 1 "$FULCRUM" run --config "$WORK/fulcrum.toml" & PIDS+=($!); PID[fulcrum]=$!
  wait_port $P_NGINX; wait_port $P_FULCRUM
  for _ in $(seq 100); do [[ -n "$(pgrep -P "${PID[nginx]}")" ]] && break; sleep 0.05; done
  sleep 0.5
}
start_proxies

# One run: prints "req/s p99_ms cpu_us_per_req" (p99 0 for h2load, which prints none).
run() {  # $1 row, $2 proxy
  local port=${PORT[$2]} pid=${PID[$2]} out before after requests rps p99=0
  local url="https://127.0.0.1:$port/"
  case $1 in
    https-keepalive) taskset -c 0 wrk -t1 -c"$CONNS" -d1s "$url" >/dev/null 2>&1 || true ;;
    https-new-conn) taskset -c 0 wrk -t1 -c"$CONNS" -d1s -H "Connection: close" "$url" >/dev/null 2>&1 || true ;;
    h2-tls) taskset -c 0 h2load -c"$CONNS" -m10 -t1 -D1 "$url" >/dev/null 2>&1 || true ;;
  esac
  before=$(cpu_ticks "$pid")
  case $1 in
    https-keepalive) out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url") ;;
    https-new-conn) out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Connection: close" "$url") ;;
    h2-tls) out=$(taskset -c 0 h2load -c"$CONNS" -m10 -t1 -D"$DURATION" "$url") ;;
  esac
  after=$(cpu_ticks "$pid")
  if [[ $1 == h2-tls ]]; then
    requests=$(awk '/^requests:/{print $8}' <<<"$out")   # "N succeeded"
    rps=$(awk '/^finished in/{gsub(",", "", $4); print $4}' <<<"$out")
    local failed; failed=$(awk '/^requests:/{print $10}' <<<"$out")
    [[ "${failed:-0}" != 0 ]] && echo "  ($2 $1: $failed failed)" >&2
  else
    requests=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
    p99=$(to_ms "$(awk '$1=="99%"{print $2}' <<<"$out")")
    local errors; errors=$(awk '/Non-2xx|Socket errors/{print}' <<<"$out" | tr '\n' ' ')
    [[ -n "$errors" ]] && echo "  ($2 $1: $errors)" >&2
  fi
  awk -v r="$rps" -v p="$p99" -v t=$((after - before)) -v hz="$HZ" -v n="${requests:-0}" \
    'BEGIN{printf "%s %s %.1f\n", r, p, n ? t * 1e6 / hz / n : 0}'
}

echo "# Fulcrum and nginx over TLS — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, 1 worker each pinned to core 1, $CONNS conns, ${DURATION}s per run, $REPEAT runs per row interleaved"
echo "# nginx $(nginx -v 2>&1 | sed 's/.*\///'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), $(h2load --version 2>&1 | head -1)"
echo
echo "| row | run | proxy | req/s | p99 ms | CPU µs/req |"
echo "| --- | --- | --- | --- | --- | --- |"
declare -A results=()
for row in https-keepalive https-new-conn h2-tls; do
  for i in $(seq "$REPEAT"); do
    order="nginx fulcrum"; ((i % 2 == 0)) && order="fulcrum nginx"
    for proxy in $order; do
      line=$(run "$row" "$proxy")
      results[$row.$proxy]+="$line"$'\n'
      echo "| $row | $i | $proxy | ${line// / | } |"
    done
  done
done

median() { python3 -c 'import sys, statistics
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
print(" ".join("%g" % statistics.median(c) for c in zip(*rows)))'; }
echo
echo "## medians"
echo
echo "| row | proxy | req/s | p99 ms | CPU µs/req | req/s ÷ nginx | CPU ÷ nginx |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for row in https-keepalive https-new-conn h2-tls; do
  read -r n_rps n_p99 n_cpu <<<"$(median <<<"${results[$row.nginx]}")"
  for proxy in nginx fulcrum; do
    read -r rps p99 cpu <<<"$(median <<<"${results[$row.$proxy]}")"
    awk -v row="$row" -v proxy="$proxy" -v rps="$rps" -v p99="$p99" -v cpu="$cpu" -v nr="$n_rps" -v nc="$n_cpu" \
      'BEGIN{printf "| %s | %s | %.0f | %s | %s | %.2f | %.2f |\n", row, proxy, rps, p99, cpu, nr ? rps/nr : 0, nc ? cpu/nc : 0}'
  done
done

if ((IDLE > 0)); then
  echo
  echo "## $IDLE idle connections held (RSS of the proxy, KiB: before, held; per connection)"
  echo
  echo "| protocol | proxy | held | RSS before | RSS held | bytes per connection |"
  echo "| --- | --- | --- | --- | --- | --- |"
  for protocol in tls h2; do
    start_proxies
    for proxy in nginx fulcrum; do
      read -r held before idle _ _ <<<"$(python3 benches/idle_conns.py --protocol "$protocol" --settle 1 \
        "${PORT[$proxy]}" "$IDLE" $(tree_pids "${PID[$proxy]}"))"
      awk -v p="$protocol" -v x="$proxy" -v h="$held" -v b="$before" -v i="$idle" \
        'BEGIN{printf "| %s | %s | %d | %d | %d | %.0f |\n", p, x, h, b, i, h ? (i - b) * 1024 / h : 0}'
    done
  done
fi
