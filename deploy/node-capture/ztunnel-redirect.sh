#!/bin/sh
# Traffic redirection for ztunnel-tpc in shared mode (one proxy per node, host network), in the
# manner of Istio's original ambient design: TPROXY in the mangle table sends pod traffic to the
# proxy without rewriting addresses, policy routing delivers it locally, and the proxy's own
# upstream connections (marked with PACKET_MARK) are never captured again.
#
#   ztunnel-redirect.sh add      install, or replace an earlier install in place (no moment
#                                without capture: the new rules are in before the old go)
#   ztunnel-redirect.sh remove   remove everything this script installs
#   ztunnel-redirect.sh check    exit 0 when installed
#
# Settings (environment):
#   POD_CIDRS       pod address ranges on this node, space separated (required for add)
#   POD_IFACES      pod-facing interface name patterns, iptables style (default: "veth+ cali+")
#   PACKET_MARK     the proxy's SO_MARK (default 1337, as the proxy's default)
#   OUTBOUND_PORT   15001   INBOUND_PLAINTEXT_PORT  15006   HBONE_PORT  15008
#   ROUTE_TABLE     policy routing table for captured packets (default 133)
set -eu

POD_IFACES=${POD_IFACES:-"veth+ cali+"}
PACKET_MARK=${PACKET_MARK:-1337}
OUTBOUND_PORT=${OUTBOUND_PORT:-15001}
INBOUND_PLAINTEXT_PORT=${INBOUND_PLAINTEXT_PORT:-15006}
HBONE_PORT=${HBONE_PORT:-15008}
ROUTE_TABLE=${ROUTE_TABLE:-133}
# The mark TPROXY puts on captured packets (distinct from the proxy's own).
CAPTURE_MARK=0x111
CHAIN=ZTUNNEL-PREROUTING
OUT_CHAIN=ZTUNNEL-OUTPUT
# Where a re-install builds its rules before they replace the installed ones.
NEXT=-NEXT

# Both IP families: iptables/ip6tables, and `ip -4`/`ip -6` for policy routing.
ipt4() { iptables -w -t mangle "$@"; }
ipt6() { ip6tables -w -t mangle "$@"; }

# drop_chain IPT HOOK NAME: unhooks and deletes chain NAME, if it exists.
drop_chain() {
    while $1 -D "$2" -j "$3" 2>/dev/null; do :; done
    $1 -F "$3" 2>/dev/null || true
    $1 -X "$3" 2>/dev/null || true
}

remove_family() { # $1: 4|6
    ipt=ipt$1
    for suffix in "" "$NEXT"; do
        drop_chain "$ipt" PREROUTING "$CHAIN$suffix"
        drop_chain "$ipt" OUTPUT "$OUT_CHAIN$suffix"
    done
    while ip "-$1" rule del fwmark "$CAPTURE_MARK" lookup "$ROUTE_TABLE" 2>/dev/null; do :; done
    ip "-$1" route flush table "$ROUTE_TABLE" 2>/dev/null || true
}

remove() {
    remove_family 4
    if command -v ip6tables >/dev/null 2>&1; then remove_family 6; fi
}

add_family() { # $1: 4|6, $2: the pod CIDRs of that family
    ipt=ipt$1
    # The rules go into fresh chains first (left over from an interrupted run: dropped).
    drop_chain "$ipt" OUTPUT "$OUT_CHAIN$NEXT"
    drop_chain "$ipt" PREROUTING "$CHAIN$NEXT"
    out=$OUT_CHAIN$NEXT
    pre=$CHAIN$NEXT
    # The proxy's own connections carry its mark; keep it on the connection so their replies
    # are recognised too.
    $ipt -N "$out"
    $ipt -A "$out" -m mark --mark "$PACKET_MARK" -j CONNMARK --save-mark
    $ipt -N "$pre"
    $ipt -A "$pre" -m mark --mark "$PACKET_MARK" -j RETURN
    # Packets of connections the proxy already holds on a transparent socket (captured ones, and
    # replies to its upstream connections made from a client's address) are delivered to it.
    $ipt -A "$pre" -p tcp -m socket --transparent -j MARK --set-mark "$CAPTURE_MARK"
    $ipt -A "$pre" -m mark --mark "$CAPTURE_MARK" -j RETURN
    # Replies to its other upstream connections (by connection mark) go straight through.
    $ipt -A "$pre" -m connmark --mark "$PACKET_MARK" -j RETURN
    for cidr in $2; do
        # Inbound HBONE to a pod of this node goes to the proxy's HBONE listener.
        divert "$ipt" "$pre" -p tcp -d "$cidr" --dport "$HBONE_PORT" -- "$HBONE_PORT"
        # Outbound: TCP a pod sends (same-node destinations included: the proxy decides).
        for ifc in $POD_IFACES; do
            divert "$ipt" "$pre" -p tcp -i "$ifc" -s "$cidr" -- "$OUTBOUND_PORT"
        done
        # Other inbound TCP to a pod of this node: the plaintext listener.
        divert "$ipt" "$pre" -p tcp -d "$cidr" -- "$INBOUND_PLAINTEXT_PORT"
    done
    # Captured packets are delivered locally, to the proxy's transparent listeners (in place
    # before any rule captures).
    if ! ip "-$1" rule show | grep -q "fwmark $CAPTURE_MARK lookup $ROUTE_TABLE\$"; then
        ip "-$1" rule add fwmark "$CAPTURE_MARK" lookup "$ROUTE_TABLE"
    fi
    if [ "$1" = 4 ]; then
        ip -4 route replace local 0.0.0.0/0 dev lo table "$ROUTE_TABLE"
    else
        ip -6 route replace local ::/0 dev lo table "$ROUTE_TABLE"
    fi
    # The new chains are hooked in before the old ones are unhooked: a packet meets one set or
    # both (the same rules), never neither, so a re-install (a new pod of the DaemonSet) lets
    # nothing bypass the proxy and breaks no captured connection.
    $ipt -A OUTPUT -j "$out"
    $ipt -A PREROUTING -j "$pre"
    drop_chain "$ipt" OUTPUT "$OUT_CHAIN"
    drop_chain "$ipt" PREROUTING "$CHAIN"
    $ipt -E "$out" "$OUT_CHAIN"
    $ipt -E "$pre" "$CHAIN"
}

# divert IPT CHAIN MATCH... -- PORT: new connections matching MATCH go to the listener on PORT.
divert() {
    ipt=$1; chain=$2; shift 2
    match=""
    while [ "$1" != "--" ]; do match="$match $1"; shift; done
    port=$2
    # shellcheck disable=SC2086 # $match is a word list on purpose
    $ipt -A "$chain" $match -j TPROXY --on-port "$port" --tproxy-mark "$CAPTURE_MARK/0xfff"
}

add() {
    : "${POD_CIDRS:?set POD_CIDRS to the pod address ranges of this node}"
    # Connections queued on a closing listener move to the next proxy's (restart handoff).
    sysctl -q -w net.ipv4.tcp_migrate_req=1 || echo "warning: tcp_migrate_req not supported" >&2
    v4=""; v6=""
    for cidr in $POD_CIDRS; do
        case "$cidr" in
            *:*) v6="$v6 $cidr" ;;
            *) v4="$v4 $cidr" ;;
        esac
    done
    add_family 4 "$v4"
    if [ -n "$v6" ]; then
        add_family 6 "$v6"
    elif command -v ip6tables >/dev/null 2>&1; then
        remove_family 6 # an earlier install had IPv6 pods; this one has none
    fi
}

check() {
    ipt4 -C PREROUTING -j "$CHAIN" 2>/dev/null && ipt4 -C OUTPUT -j "$OUT_CHAIN" 2>/dev/null \
        && ip -4 rule show | grep -q "lookup $ROUTE_TABLE"
}

case "${1:-}" in
    add) add ;;
    remove) remove ;;
    check) check ;;
    *) echo "usage: $0 add|remove|check" >&2; exit 2 ;;
esac
