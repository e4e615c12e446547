#!/bin/bash
# Zero-copy send against plain send(2) over a veth pair between two scratch network namespaces
# (root). Prints the sender's CPU per GB and throughput, REPS runs of each (default 3).
# Usage: perf/zerocopy/run.sh [REPS] [MIB] [CHUNK]
set -euo pipefail
reps=${1:-3}
mib=${2:-4096}
chunk=${3:-262144}
[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces)" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
a=zc-a-$$
b=zc-b-$$
recv_pid=
cleanup() {
    if [ -n "$recv_pid" ]; then kill "$recv_pid" 2>/dev/null || true; wait "$recv_pid" 2>/dev/null || true; fi
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
gcc -O2 -Wall -o "$work/zc" "$here/zc.c"
ip netns add "$a"
ip netns add "$b"
ip link add zca$$ netns "$a" type veth peer name zcb$$ netns "$b"
ip -n "$a" addr add 10.77.0.1/24 dev zca$$
ip -n "$b" addr add 10.77.0.2/24 dev zcb$$
ip -n "$a" link set zca$$ up
ip -n "$b" link set zcb$$ up
ip netns exec "$b" "$work/zc" recv 9555 &
recv_pid=$!
sleep 0.5
for _ in $(seq "$reps"); do
    for zerocopy in 0 1; do
        timeout 120 ip netns exec "$a" "$work/zc" send 10.77.0.2 9555 "$mib" "$chunk" "$zerocopy"
    done
done
