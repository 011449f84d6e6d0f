#!/usr/bin/env bash
# Deploy flushctl on this host (Debian 12, as root) with the playbook next
# to this script: installs ansible-core into its own virtualenv first.
#   ansible/bootstrap.sh [-e @VARS.yml] [other ansible-playbook options]
# Without -e, the example vars (customer.example) are used.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv=/opt/flushctl-ansible
if [ "$(id -u)" -ne 0 ]; then
    echo "Error: run this as root" >&2
    exit 1
fi
# Debian's own python3 runs ansible and its apt module (python3-apt).
if ! dpkg -s python3-venv python3-apt >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-apt >/dev/null
fi
if [ ! -x "$venv/bin/ansible-playbook" ]; then
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'ansible-core>=2.16,<2.20'
fi
args=("$@")
[ "${#args[@]}" -gt 0 ] || args=(-e "@$here/example-vars.yml")
export ANSIBLE_CONFIG="$here/ansible.cfg"
exec "$venv/bin/ansible-playbook" -i localhost, -c local "$here/site.yml" "${args[@]}"
