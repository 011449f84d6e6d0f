#!/usr/bin/env bash
# Interim deploy: set up and run flushctl next to this machine's Postfix
# (Debian 12, as root), with the example customer domain customer.example.
# The Ansible role replaces this script.
#
# - installs Postfix and the build dependencies
# - installs the project into /opt/flushctl (a virtualenv), flushctl on PATH
# - writes /etc/flushctl/flushctl.toml if it does not exist yet
# - runs `flushctl apply` on /etc/postfix, starts Postfix, the milter and the
#   finger/ETRN gateway and the reachability poller
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/flushctl
config=/etc/flushctl/flushctl.toml

if [ "$(id -u)" -ne 0 ]; then
    echo "Error: run this as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postfix libmilter-dev python3-venv python3-dev gcc swaks >/dev/null

python3 -m venv "$prefix"
"$prefix/bin/pip" install -q --disable-pip-version-check "$here"
ln -sf "$prefix/bin/flushctl" /usr/local/sbin/flushctl

install -d -m 0755 /etc/flushctl
install -d -m 0750 /var/lib/flushctl /var/log/flushctl
if [ ! -e "$config" ]; then
    cat > "$config" <<'TOML'
# flushctl configuration; see the README for every key.
[postfix]
config_directory = "/etc/postfix"

[state]
directory = "/var/lib/flushctl"

[milter]
listen = "unix:/var/spool/postfix/flushctl/milter.sock"

# The example customer: its mail server is expected on 127.0.0.1:2525.
[domains."customer.example"]
relay = "[127.0.0.1]:2525"
TOML
    echo "wrote $config"
fi

flushctl --config "$config" apply

if ! postfix status >/dev/null 2>&1; then
    if [ -x /etc/init.d/postfix ]; then
        /etc/init.d/postfix start
    else
        postfix start
    fi
fi

# The daemons run in the background (under systemd the Ansible role installs units).
start_daemon() {
    local name=$1
    local pidfile=/run/flushctl-$name.pid
    start-stop-daemon --stop --quiet --pidfile "$pidfile" --remove-pidfile --retry TERM/10 || true
    start-stop-daemon --start --background --make-pidfile --pidfile "$pidfile" \
        --output "/var/log/flushctl/$name.log" \
        --exec "$prefix/bin/flushctl" -- --config "$config" "$name"
}
start_daemon milter
start_daemon gateway
start_daemon poller
for _ in $(seq 50); do
    [ -S /var/spool/postfix/flushctl/milter.sock ] && break
    sleep 0.2
done
if [ ! -S /var/spool/postfix/flushctl/milter.sock ]; then
    echo "Error: the milter did not start; see /var/log/flushctl/milter.log" >&2
    exit 1
fi
sleep 1
if ! start-stop-daemon --status --pidfile /run/flushctl-gateway.pid; then
    echo "Error: the gateway did not start; see /var/log/flushctl/gateway.log" >&2
    exit 1
fi
echo "flushctl is running: try 'flushctl status'"
