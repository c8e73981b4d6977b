#!/bin/sh
# Applies imds-lockdown.nft: only the imds-agent user may reach IMDS (and no
# forwarded container traffic may); the container link answers only this
# host and its bridges.
# Usage: apply-imds-lockdown.sh [RULES_FILE]   (run as root, after the user exists)
# IMDS_LOCKDOWN_USER: the user let through, a name or a numeric uid (default
# imds-agent, the package's user; tests give the uid their agent runs as).
# Anything else (a leading '-', which `id` would take as an option, or any
# character outside [A-Za-z0-9_.-], which could reach the rule's syntax) is
# refused before the rule is touched.
set -eu
rules=${1:-/usr/share/imds-agent/imds-lockdown.nft}
user=${IMDS_LOCKDOWN_USER:-imds-agent}
case $user in
  '' | -* | *[!A-Za-z0-9_.-]*)
    echo "apply-imds-lockdown: IMDS_LOCKDOWN_USER='$user' is not a user name or uid" >&2
    exit 1 ;;
  *[!0-9]*)
    if ! id "$user" >/dev/null 2>&1; then
      echo "apply-imds-lockdown: the $user user does not exist; install the package first" >&2
      exit 1
    fi
    match="\"$user\"" ;;
  *) match=$user ;;
esac
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
sed "s/\"imds-agent\"/$match/g" "$rules" >"$tmp"
nft -c -f "$tmp"
nft -f "$tmp"
echo "IMDS is now reachable only by $user (IPv4 169.254.169.254 and IPv6 fd00:ec2::254), and by no forwarded (container) traffic."
