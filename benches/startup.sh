#!/usr/bin/env bash
# Start-up and memory of the chat over a filled store (BENCHMARKS.md, "Start-up and memory").
# usage: benches/startup.sh sqlite:///tmp/bench/chat.db   (or postgres://…; fill it first with
# target/release/livechat-fill --database-url URL: 1 000 rooms × 1 000 messages)
set -euo pipefail
URL=${1:?usage: benches/startup.sh DATABASE_URL}
cd "$(dirname "$0")/.."
cargo build --release -p livechat-app --bin livechat-app --bin livechat-fill
t0=$(date +%s%N); target/release/livechat-app --listen 127.0.0.1:4811 --database-url "$URL" & pid=$!
trap 'kill -INT $pid 2>/dev/null || true' EXIT
until curl -s -H 'Cookie: livechat_name=bench' http://127.0.0.1:4811/room-0500 | grep -q 'message 999 of room 500'; do sleep 0.02; done
echo "first room page with its latest message: $(( ($(date +%s%N) - t0) / 1000000 )) ms"; grep VmRSS /proc/$pid/status
for r in $(seq 0 10 999); do room=$(printf 'room-%04d' "$r")
  curl -s -o /dev/null -H 'Cookie: livechat_name=bench' "http://127.0.0.1:4811/$room"
  for b in 901 801 701; do curl -s -o /dev/null "http://127.0.0.1:4811/$room/older?before=$(( r * 1000 + b ))"; done
done
echo "after browsing 100 rooms:"; grep VmRSS /proc/$pid/status
