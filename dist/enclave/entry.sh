#!/bin/sh
# The enclave's entry point: what the workshop's run.sh does, with
# vsock-relay instead of traffic_forwarder.py and server.py:
#   1. bring the loopback interface up and map the remote host name to
#      127.0.0.1 in /etc/hosts (forward --hosts does both);
#   2. the forwarder: TCP 127.0.0.1:443 -> vsock PARENT_CID:PROXY_PORT, where
#      the parent's vsock-proxy waits;
#   3. the sample server on vsock port SERVER_PORT (any CID), in the
#      foreground: the enclave lives as long as it does; or, with SERVER
#      set, that command instead (the enclave's own application).
# Settings (environment): PARENT_CID (3: the parent), PROXY_PORT (8001),
# SERVER_PORT (5005), REMOTE_HOST (ip-ranges.amazonaws.com), SERVE_ARGS
# (extra options of `vsock-relay serve`, e.g. --ca-file), VSOCK_RELAY
# (/bin/vsock-relay), SERVER (empty: `vsock-relay serve`; else a command
# line, split at spaces, run in the foreground in its place, e.g.
# SERVER="python3 /app/server.py server 5005", the workshop's server
# unchanged: with EGRESS=transparent it needs no hosts line and no proxy
# setting; with connect or socks5 it must take its proxy setting itself),
# and EGRESS:
#   static   (default) the workshop's way: 127.0.0.1:443 and a hosts line
#            for REMOTE_HOST, to a parent proxy of that one destination;
#   connect  one egress port for every allowed host: a forwarder on
#            127.0.0.1:EGRESS_PORT (3128) to the parent's
#            `vsock-relay proxy --route connect`, and the server set to use
#            it as its HTTPS proxy (no hosts line);
#   socks5   the same with `--route socks5` on the parent (socks5h://).
#   transparent  any application, unchanged: names resolve through
#            `vsock-relay dns` (127.0.0.1:53, resolv.conf written) to the
#            parent's `route: dns` on DNS_PORT (8053); every outgoing TCP
#            connection not to loopback is redirected by legacy iptables
#            (AWS's enclave kernel, 4.14, has no nf_tables and loads no
#            modules; its NAT and REDIRECT are built in) to
#            `forward --transparent` on CAPTURE_PORT (8100), which carries
#            the original destination to the parent's `route: transparent`
#            on PROXY_PORT. Needs an `iptables-legacy` (or legacy
#            `iptables`) in the image: the Dockerfile's `transparent` stage.
set -eu
PARENT_CID=${PARENT_CID:-3}
PROXY_PORT=${PROXY_PORT:-8001}
SERVER_PORT=${SERVER_PORT:-5005}
REMOTE_HOST=${REMOTE_HOST:-ip-ranges.amazonaws.com}
VSOCK_RELAY=${VSOCK_RELAY:-/bin/vsock-relay}
EGRESS=${EGRESS:-static}
EGRESS_PORT=${EGRESS_PORT:-3128}
DNS_PORT=${DNS_PORT:-8053}
CAPTURE_PORT=${CAPTURE_PORT:-8100}

case "$EGRESS" in
static)
    # A scratch image has no /etc for the hosts line.
    [ -d /etc ] || /bin/busybox mkdir -p /etc
    echo "enclave: forwarder 127.0.0.1:443 -> vsock:$PARENT_CID:$PROXY_PORT for $REMOTE_HOST; server on vsock port $SERVER_PORT"
    "$VSOCK_RELAY" forward 127.0.0.1 443 "$PARENT_CID" "$PROXY_PORT" --hosts "$REMOTE_HOST" &
    PROXY_ARGS=""
    ;;
connect | socks5)
    scheme=http
    [ "$EGRESS" = connect ] || scheme=socks5h
    echo "enclave: egress port 127.0.0.1:$EGRESS_PORT ($EGRESS) -> vsock:$PARENT_CID:$PROXY_PORT; server on vsock port $SERVER_PORT"
    "$VSOCK_RELAY" forward --listen "tcp:127.0.0.1:$EGRESS_PORT" --to "vsock:$PARENT_CID:$PROXY_PORT" --loopback-up &
    PROXY_ARGS="--proxy $scheme://127.0.0.1:$EGRESS_PORT"
    ;;
transparent)
    iptables=iptables-legacy
    command -v "$iptables" >/dev/null 2>&1 || iptables=iptables
    # The enclave has no route off the machine: a default route via the
    # loopback interface, with a source address of its own on it (without
    # one a connect is made from 0.0.0.0 and no answer comes), makes every
    # connect reach the redirect.
    ip link set lo up
    ip addr add 10.0.2.15/32 dev lo 2>/dev/null || true
    ip route add default dev lo src 10.0.2.15 2>/dev/null || true
    ip route | grep -q '^default .*dev lo' || {
        echo "enclave: no default route via lo (ip route add default dev lo src 10.0.2.15 failed): outside connects would not reach the redirect" >&2
        exit 1
    }
    "$iptables" -t nat -A OUTPUT -p tcp ! -d 127.0.0.0/8 -j REDIRECT --to-ports "$CAPTURE_PORT"
    echo "enclave: DNS 127.0.0.1:53 -> vsock:$PARENT_CID:$DNS_PORT; TCP redirected to 127.0.0.1:$CAPTURE_PORT -> vsock:$PARENT_CID:$PROXY_PORT; server on vsock port $SERVER_PORT"
    "$VSOCK_RELAY" dns --listen udp:127.0.0.1:53 --to "vsock:$PARENT_CID:$DNS_PORT" --resolv-conf &
    "$VSOCK_RELAY" forward --transparent --listen "tcp:127.0.0.1:$CAPTURE_PORT" --to "vsock:$PARENT_CID:$PROXY_PORT" &
    PROXY_ARGS=""
    ;;
*)
    echo "enclave: EGRESS must be static, connect, socks5 or transparent, not \`$EGRESS'" >&2
    exit 2
    ;;
esac
if [ -n "${SERVER:-}" ]; then
    echo "enclave: server: $SERVER"
    # shellcheck disable=SC2086 # SERVER is a command line
    exec $SERVER
fi
# shellcheck disable=SC2086 # PROXY_ARGS and SERVE_ARGS are lists of options
exec "$VSOCK_RELAY" serve "$SERVER_PORT" $PROXY_ARGS ${SERVE_ARGS:-}
