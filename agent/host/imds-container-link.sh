#!/bin/sh
# Gives this host the container link: 169.254.170.23/32 and fd00:ec2::23/128,
# the link-local hosts every AWS SDK accepts in AWS_CONTAINER_CREDENTIALS_FULL_URI,
# on a link of their own, where imds-agent-container.socket binds port 80 for
# the agent (which has no capabilities) and containers on local bridges reach
# it through the host.
# Usage: imds-container-link.sh up|down [LINK]   (as root; LINK: imds-agent0)
# `up` creates LINK as a `dummy` link when it does not exist (a link that
# exists, such as `lo` in tests, is used as it is), adds both addresses and
# brings it up; `down` removes the addresses, and the link if `up` created it.
# Both are idempotent. IPv6 is skipped when the host has it disabled.
set -eu
action=${1:-}
link=${2:-imds-agent0}
v4=169.254.170.23/32
v6=fd00:ec2::23/128
have_ipv6() { [ -e /proc/sys/net/ipv6/conf/all/disable_ipv6 ] && [ "$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6)" = 0 ]; }
case $action in
  up)
    if ! ip link show dev "$link" >/dev/null 2>&1; then
      ip link add "$link" type dummy
      ip link set dev "$link" alias "imds-agent container link"
    fi
    ip addr replace "$v4" dev "$link"
    if have_ipv6; then
      ip -6 addr replace "$v6" dev "$link" nodad
    fi
    ip link set dev "$link" up
    echo "imds-container-link: $v4 and $v6 on $link; containers reach http://169.254.170.23/v1/credentials"
    ;;
  down)
    ip addr del "$v4" dev "$link" 2>/dev/null || :
    ip -6 addr del "$v6" dev "$link" 2>/dev/null || :
    if ip -d link show dev "$link" 2>/dev/null | grep -q 'alias imds-agent container link'; then
      ip link del dev "$link"
    fi
    ;;
  *)
    echo "usage: imds-container-link.sh up|down [LINK]" >&2
    exit 2
    ;;
esac
