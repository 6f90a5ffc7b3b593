#!/bin/sh
# The enclave's entry point: what the workshop's run.sh does, with
# vsock-relay instead of traffic_forwarder.py and server.py:
#   1. bring the loopback interface up and map the remote host name to
#      127.0.0.1 in /etc/hosts (forward --hosts does both);
#   2. the forwarder: TCP 127.0.0.1:443 -> vsock PARENT_CID:PROXY_PORT, where
#      the parent's vsock-proxy waits;
#   3. the sample server on vsock port SERVER_PORT (any CID), in the
#      foreground: the enclave lives as long as it does.
# Settings (environment): PARENT_CID (3: the parent), PROXY_PORT (8001),
# SERVER_PORT (5005), REMOTE_HOST (ip-ranges.amazonaws.com), SERVE_ARGS
# (extra options of `vsock-relay serve`, e.g. --ca-file), VSOCK_RELAY
# (/bin/vsock-relay), and EGRESS:
#   static   (default) the workshop's way: 127.0.0.1:443 and a hosts line
#            for REMOTE_HOST, to a parent proxy of that one destination;
#   connect  one egress port for every allowed host: a forwarder on
#            127.0.0.1:EGRESS_PORT (3128) to the parent's
#            `vsock-relay proxy --route connect`, and the server set to use
#            it as its HTTPS proxy (no hosts line);
#   socks5   the same with `--route socks5` on the parent (socks5h://).
set -eu
PARENT_CID=${PARENT_CID:-3}
PROXY_PORT=${PROXY_PORT:-8001}
SERVER_PORT=${SERVER_PORT:-5005}
REMOTE_HOST=${REMOTE_HOST:-ip-ranges.amazonaws.com}
VSOCK_RELAY=${VSOCK_RELAY:-/bin/vsock-relay}
EGRESS=${EGRESS:-static}
EGRESS_PORT=${EGRESS_PORT:-3128}

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
*)
    echo "enclave: EGRESS must be static, connect or socks5, not \`$EGRESS'" >&2
    exit 2
    ;;
esac
# shellcheck disable=SC2086 # PROXY_ARGS and SERVE_ARGS are lists of options
exec "$VSOCK_RELAY" serve "$SERVER_PORT" $PROXY_ARGS ${SERVE_ARGS:-}
