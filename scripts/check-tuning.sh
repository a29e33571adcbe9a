#!/bin/sh
# Syntax-check the deployment files in tuning/ with the real tools, when they
# are installed: nginx -t on tuning/nginx.conf (with a throwaway certificate
# and scratch paths swapped in), caddy validate on tuning/Caddyfile, and
# systemd-analyze verify on tuning/shardcast.service (ExecStart pointed at a
# built binary), nats-server -t on tuning/cluster/nats-server.conf and
# systemd-analyze verify on tuning/cluster/nats-server.service. A missing tool is reported and skipped; a failing check exits
# non-zero. The profiles themselves are checked by `cargo test --test it profiles::`.
set -eu
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0

if command -v nginx >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
        -keyout "$tmp/privkey.pem" -out "$tmp/fullchain.pem" 2>/dev/null
    mkdir -p "$tmp/logs"
    sed -e "s#/etc/ssl/shardcast/#$tmp/#g" \
        -e "s#/run/nginx.pid#$tmp/nginx.pid#" \
        -e "s#/var/log/nginx/#$tmp/logs/#g" \
        tuning/nginx.conf >"$tmp/nginx.conf"
    if nginx -t -q -p "$tmp" -c "$tmp/nginx.conf"; then
        echo "nginx -t: tuning/nginx.conf ok"
    else
        echo "nginx -t: tuning/nginx.conf FAILED"; status=1
    fi
else
    echo "nginx -t: skipped (nginx or openssl not installed)"
fi

if command -v caddy >/dev/null 2>&1; then
    if caddy validate --adapter caddyfile --config tuning/Caddyfile; then
        echo "caddy validate: tuning/Caddyfile ok"
    else
        echo "caddy validate: tuning/Caddyfile FAILED"; status=1
    fi
else
    echo "caddy validate: skipped (caddy not installed)"
fi

if command -v systemd-analyze >/dev/null 2>&1; then
    bin=${SHARDCAST_BIN:-$PWD/target/release/shardcast}
    if [ -x "$bin" ]; then
        sed -e "s#/usr/local/bin/shardcast#$bin#" tuning/shardcast.service >"$tmp/shardcast.service"
        # verify also checks that User= exists; a fresh box has no shardcast
        # user yet, so only warnings about it are tolerated.
        out=$(systemd-analyze verify "$tmp/shardcast.service" 2>&1) || true
        bad=$(printf '%s\n' "$out" | grep -v -e '^$' -e 'shardcast.env' -e "User" -e 'Failed to look up' || true)
        if [ -n "$bad" ]; then
            printf '%s\n' "$out"
            echo "systemd-analyze verify: tuning/shardcast.service FAILED"; status=1
        else
            echo "systemd-analyze verify: tuning/shardcast.service ok"
        fi
    else
        echo "systemd-analyze verify: skipped (no binary at $bin; cargo build --release)"
    fi
else
    echo "systemd-analyze verify: skipped (not installed)"
fi
if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
    nats=$(command -v nats-server || echo /usr/sbin/nats-server)
    if NATS_NAME=n1 "$nats" -t -c tuning/cluster/nats-server.conf >/dev/null 2>&1; then
        echo "nats-server -t: tuning/cluster/nats-server.conf ok"
    else
        NATS_NAME=n1 "$nats" -t -c tuning/cluster/nats-server.conf || true
        echo "nats-server -t: tuning/cluster/nats-server.conf FAILED"; status=1
    fi
else
    echo "nats-server -t: skipped (not installed)"
fi
if command -v systemd-analyze >/dev/null 2>&1 && [ -x /usr/sbin/nats-server ]; then
    out=$(systemd-analyze verify tuning/cluster/nats-server.service 2>&1) || true
    if [ -n "$(printf '%s\n' "$out" | grep -v -e '^$' || true)" ]; then
        printf '%s\n' "$out"
        echo "systemd-analyze verify: tuning/cluster/nats-server.service FAILED"; status=1
    else
        echo "systemd-analyze verify: tuning/cluster/nats-server.service ok"
    fi
fi
exit $status
