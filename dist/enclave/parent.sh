#!/bin/sh
# The parent instance's side of the enclave image in this folder: the
# allowlisted proxy, the enclave, and the workshop's client. Run as root on
# a Nitro-enabled instance with nitro-cli installed; the EIF is built as the
# Dockerfile says. Settings: EIF (vsock-relay.eif), ENCLAVE_CID (16),
# CONFIG (/etc/nitro_enclaves/vsock-proxy.yaml: must allow
# ip-ranges.amazonaws.com:443), VSOCK_PROXY (/usr/local/bin/vsock-proxy),
# VSOCK_RELAY (/usr/local/bin/vsock-relay), ROUTE (empty: the proxy of the
# one destination; connect or socks5: one routed port for every allowed
# host, for an enclave built with EGRESS=connect or socks5; transparent:
# the enclave's DNS on vsock port 8053 and its redirected connections on
# 8001, one process, for an enclave built with EGRESS=transparent).
set -eu
EIF=${EIF:-vsock-relay.eif}
ENCLAVE_CID=${ENCLAVE_CID:-16}
CONFIG=${CONFIG:-/etc/nitro_enclaves/vsock-proxy.yaml}
VSOCK_PROXY=${VSOCK_PROXY:-/usr/local/bin/vsock-proxy}
VSOCK_RELAY=${VSOCK_RELAY:-/usr/local/bin/vsock-relay}

ROUTE=${ROUTE:-}
if [ "$ROUTE" = transparent ]; then
    # One process: the transparent service allows an address when the DNS
    # service told this enclave a name the allowlist allows has it.
    services=$(mktemp)
    printf 'services:\n- {name: dns, listen: "vsock:any:8053", route: dns}\n- {name: transparent, listen: "vsock:any:8001", route: transparent}\n' >"$services"
    # -4: the enclave captures IPv4 only, so no IPv6 address is given out.
    "$VSOCK_RELAY" proxy -4 --services "$services" --config "$CONFIG" &
elif [ -n "$ROUTE" ]; then
    "$VSOCK_RELAY" proxy --listen vsock:any:8001 --route "$ROUTE" --config "$CONFIG" &
else
    "$VSOCK_PROXY" 8001 ip-ranges.amazonaws.com 443 --config "$CONFIG" &
fi
nitro-cli run-enclave --eif-path "$EIF" --cpu-count 2 --memory 512 --enclave-cid "$ENCLAVE_CID"
# The server answers once the enclave booted: ask until it does (a minute).
tries=0
until "$VSOCK_RELAY" client "$ENCLAVE_CID" 5005 us-east-1; do
    tries=$((tries + 1))
    [ "$tries" -lt 30 ] || exit 1
    sleep 2
done
