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
# (/bin/vsock-relay).
set -eu
PARENT_CID=${PARENT_CID:-3}
PROXY_PORT=${PROXY_PORT:-8001}
SERVER_PORT=${SERVER_PORT:-5005}
REMOTE_HOST=${REMOTE_HOST:-ip-ranges.amazonaws.com}
VSOCK_RELAY=${VSOCK_RELAY:-/bin/vsock-relay}

# A scratch image has no /etc for the hosts line.
[ -d /etc ] || /bin/busybox mkdir -p /etc
echo "enclave: forwarder 127.0.0.1:443 -> vsock:$PARENT_CID:$PROXY_PORT for $REMOTE_HOST; server on vsock port $SERVER_PORT"
"$VSOCK_RELAY" forward 127.0.0.1 443 "$PARENT_CID" "$PROXY_PORT" --hosts "$REMOTE_HOST" &
# shellcheck disable=SC2086 # SERVE_ARGS is a list of options
exec "$VSOCK_RELAY" serve "$SERVER_PORT" ${SERVE_ARGS:-}
