#!/bin/sh
# Applies imds-lockdown.nft: only the imds-agent user may reach IMDS.
# Usage: apply-imds-lockdown.sh [RULES_FILE]   (run as root, after the user exists)
set -eu
rules=${1:-/usr/share/imds-agent/imds-lockdown.nft}
if ! id imds-agent >/dev/null 2>&1; then
  echo "apply-imds-lockdown: the imds-agent user does not exist; install the package first" >&2
  exit 1
fi
nft -c -f "$rules"
nft -f "$rules"
echo "IMDS is now reachable only by the imds-agent user (IPv4 169.254.169.254 and IPv6 fd00:ec2::254)."
