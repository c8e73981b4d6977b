#!/usr/bin/env bash
# Tests the RPM beyond its metadata. CI runs it after the `rpm -qp` checks; by
# hand, as root: bash agent/rpm/test-rpm.sh target/generate-rpm/imds-agent-*.rpm
#
# 1. Installs it into a throwaway root without scriptlets: the files land with
#    their modes; an edited /etc/sysconfig/imds-agent survives a reinstall and
#    is kept as .rpmsave on erase (that it is noreplace, which matters when a
#    new version changes the file, .ci/run reads from its flags); outputs
#    under /var/lib/imds-agent stay on erase.
# 2. Runs the scriptlets as packaged (the RPM's text, not agent/rpm/*.sh) in a
#    private mount namespace with a copy of /etc, the package's units and
#    presets (behind the distribution's `disable *` default) and no running
#    systemd, so systemctl works on unit files offline: %pre creates the user
#    (systemd-sysusers, and useradd without it); %post enables the units on
#    first install only and honours an admin's preset; %preun disables them
#    (and the lock-down) on erase only. The host's /etc and units are not touched.
set -euo pipefail

rpmfile=$1
fail() { echo "test-rpm: FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (it installs into a throwaway root and uses a mount namespace)"
[ -d /usr/lib/systemd/system ] && [ -d /usr/lib/systemd/system-preset ] && command -v systemctl >/dev/null ||
  fail "needs systemd's systemctl and /usr/lib/systemd/{system,system-preset} (apt-get install systemd)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root

# 1. Files, config and erase, in a throwaway root (no scriptlets run there).
rpm --root "$root" -i --nodeps --noscripts "$rpmfile"
for want in '755 /usr/bin/imds-agent' '644 /etc/sysconfig/imds-agent' \
    '644 /usr/lib/systemd/system/imds-agent.service' '644 /usr/lib/systemd/system/imds-agent.socket' \
    '644 /usr/lib/systemd/system-preset/50-imds-agent.preset' '644 /usr/lib/sysusers.d/imds-agent.conf' \
    '755 /usr/share/imds-agent/apply-imds-lockdown.sh' '644 /usr/share/imds-agent/imds-lockdown.nft' \
    '644 /usr/share/imds-agent/imds-lockdown.service' '644 /usr/share/doc/imds-agent/README.md' \
    '755 /usr/share/imds-agent/imds-container-link.sh' '644 /usr/share/imds-agent/imds-container-link.service' \
    '644 /usr/share/imds-agent/imds-agent-containers.conf' '644 /usr/share/imds-agent/imds-agent-container.socket'; do
  path=${want#* }
  [ -f "$root$path" ] || fail "expected $path in the installed root, it is missing"
  got=$(stat -c %a "$root$path")
  [ "$got" = "${want%% *}" ] || fail "expected $path with mode ${want%% *}, got $got"
done
"$root/usr/bin/imds-agent" --version >/dev/null || fail "the installed /usr/bin/imds-agent does not run (--version)"
cmp -s "$root/etc/sysconfig/imds-agent" agent/systemd/imds-agent.default ||
  fail "/etc/sysconfig/imds-agent differs from agent/systemd/imds-agent.default"

echo 'IMDS_AGENT_LOG=debug' >>"$root/etc/sysconfig/imds-agent"
rpm --root "$root" -U --replacepkgs --nodeps --noscripts "$rpmfile"
grep -qx 'IMDS_AGENT_LOG=debug' "$root/etc/sysconfig/imds-agent" ||
  fail "a reinstall replaced the edited /etc/sysconfig/imds-agent (expected %config to keep it)"

mkdir -p "$root/var/lib/imds-agent"
echo '[default]' >"$root/var/lib/imds-agent/credentials"
rpm --root "$root" -e --nodeps --noscripts imds-agent
[ ! -e "$root/usr/bin/imds-agent" ] || fail "erase left /usr/bin/imds-agent"
[ -z "$(ls -A "$root/usr/share/imds-agent" 2>/dev/null)" ] || fail "erase left files in /usr/share/imds-agent"
[ -f "$root/var/lib/imds-agent/credentials" ] || fail "erase removed the outputs in /var/lib/imds-agent"
grep -qx 'IMDS_AGENT_LOG=debug' "$root/etc/sysconfig/imds-agent.rpmsave" ||
  fail "erase did not keep the edited config as /etc/sysconfig/imds-agent.rpmsave"
echo "test-rpm: files, modes, config file and erase OK"

# 2. The scriptlets, as packaged.
rm -rf "$root"
rpm --root "$root" -i --nodeps --noscripts "$rpmfile"
for s in PREIN POSTIN PREUN POSTUN; do
  rpm -qp --qf "%{$s}" "$rpmfile" >"$work/$s.sh"
done
cp -a /etc "$work/etc"
rm -rf "$work/etc/systemd/system-preset" "$work/etc/systemd/system/"*.wants/imds-*
mkdir -p "$work/preset"
cp "$root/usr/lib/systemd/system-preset/50-imds-agent.preset" "$work/preset/"
# What Fedora and Amazon Linux ship last: anything not named is disabled.
echo 'disable *' >"$work/preset/99-default-disable.preset"

export work root
unshare --mount --propagation private bash -euo pipefail <<'INNER'
fail() { echo "test-rpm: FAILED: $*" >&2; exit 1; }
mount --bind "$work/etc" /etc
mount -t tmpfs tmpfs /run     # no /run/systemd/system: systemctl works offline
mount --bind "$root/usr/lib/systemd/system" /usr/lib/systemd/system
mount --bind "$work/preset" /usr/lib/systemd/system-preset
S=$work
no_user() { userdel imds-agent >/dev/null 2>&1 || :; groupdel imds-agent >/dev/null 2>&1 || :; }
check_user() { # $1: how it was created
  entry=$(getent passwd imds-agent) || fail "%pre ($1) did not create the imds-agent user"
  IFS=: read -r _ _ uid gid _ home shell <<<"$entry"
  group=$(getent group "$gid" | cut -d: -f1)
  [ "$group" = imds-agent ] || fail "%pre ($1): expected primary group imds-agent, got '$group' ($entry)"
  [ "$uid" -lt 1000 ] || fail "%pre ($1): expected a system uid (below 1000), got $uid"
  [ "$shell" = /usr/sbin/nologin ] && [ "$home" = / ] ||
    fail "%pre ($1): expected home / and shell /usr/sbin/nologin, got: $entry"
}
state() { systemctl is-enabled "$1" 2>/dev/null || :; }
expect() { # unit, expected is-enabled, when
  got=$(state "$1")
  [ "$got" = "$2" ] || fail "$3: expected $1 to be $2, got '$got'"
}

no_user
sh "$S/PREIN.sh" 1 || fail "%pre exited non-zero on first install (systemd-sysusers)"
check_user systemd-sysusers
before=$(getent passwd imds-agent)
sh "$S/PREIN.sh" 2 || fail "%pre exited non-zero on upgrade"
[ "$(getent passwd imds-agent)" = "$before" ] || fail "%pre on upgrade changed the user: $before -> $(getent passwd imds-agent)"
no_user
mount --bind /dev/null /usr/bin/systemd-sysusers   # not executable: the useradd path
sh "$S/PREIN.sh" 1 || fail "%pre exited non-zero on first install (useradd)"
check_user useradd
umount /usr/bin/systemd-sysusers

sh "$S/POSTIN.sh" 1 || fail "%post exited non-zero"
expect imds-agent.service enabled "after %post on first install"
expect imds-agent.socket enabled "after %post on first install"
[ -L /etc/systemd/system/multi-user.target.wants/imds-agent.service ] ||
  fail "after %post: no multi-user.target.wants/imds-agent.service link"
systemctl disable imds-agent.service imds-agent.socket >/dev/null 2>&1
sh "$S/POSTIN.sh" 2 || fail "%post exited non-zero on upgrade"
expect imds-agent.service disabled "after %post on upgrade of a unit the admin disabled"
mkdir -p /etc/systemd/system-preset
echo 'disable imds-agent.*' >/etc/systemd/system-preset/50-imds-agent.preset
sh "$S/POSTIN.sh" 1
expect imds-agent.service disabled "after %post with an admin preset that disables it"
rm /etc/systemd/system-preset/50-imds-agent.preset
sh "$S/POSTIN.sh" 1
expect imds-agent.service enabled "after %post on first install"

systemctl enable "$root/usr/share/imds-agent/imds-lockdown.service" >/dev/null 2>&1
expect imds-lockdown.service enabled "after enabling the opt-in lock-down"
systemctl enable "$root/usr/share/imds-agent/imds-container-link.service" >/dev/null 2>&1
expect imds-container-link.service enabled "after enabling the opt-in container link"
systemctl enable "$root/usr/share/imds-agent/imds-agent-container.socket" >/dev/null 2>&1
expect imds-agent-container.socket enabled "after enabling the opt-in container socket"
sh "$S/PREUN.sh" 1 || fail "%preun exited non-zero on upgrade"
expect imds-agent.service enabled "after %preun on upgrade"
expect imds-lockdown.service enabled "after %preun on upgrade"
expect imds-container-link.service enabled "after %preun on upgrade"
expect imds-agent-container.socket enabled "after %preun on upgrade"
out=$(sh "$S/PREUN.sh" 0) || fail "%preun exited non-zero on erase"
expect imds-agent.service disabled "after %preun on erase"
expect imds-agent.socket disabled "after %preun on erase"
[ -z "$(state imds-lockdown.service)" ] || expect imds-lockdown.service disabled "after %preun on erase"
grep -q 'lock-down (imds-lockdown.service) is off' <<<"$out" || fail "%preun on erase did not say the lock-down is off: $out"
[ -z "$(state imds-container-link.service)" ] || expect imds-container-link.service disabled "after %preun on erase"
grep -q 'container link (imds-container-link.service) is off' <<<"$out" || fail "%preun on erase did not say the container link is off: $out"
[ -z "$(state imds-agent-container.socket)" ] || expect imds-agent-container.socket disabled "after %preun on erase"
grep -q "container endpoint's socket (imds-agent-container.socket) is off" <<<"$out" || fail "%preun on erase did not say the container socket is off: $out"
[ -z "$(ls /etc/systemd/system/*.wants/ 2>/dev/null | grep imds)" ] || fail "after %preun on erase: links left: $(ls /etc/systemd/system/*.wants/)"

sh "$S/POSTUN.sh" 1 || fail "%postun exited non-zero on upgrade"
out=$(sh "$S/POSTUN.sh" 0) || fail "%postun exited non-zero on erase"
grep -q 'left in place' <<<"$out" || fail "%postun on erase did not say what it leaves: $out"
getent passwd imds-agent >/dev/null || fail "the imds-agent user is gone after erase (it must stay)"
# The package cannot own its directories (cargo generate-rpm lists files
# only): %postun removes them on erase when empty, and only then.
mount -t tmpfs tmpfs /usr/share
mkdir -p /usr/share/imds-agent /usr/share/doc/imds-agent
sh "$S/POSTUN.sh" 1 >/dev/null
[ -d /usr/share/imds-agent ] || fail "%postun on upgrade removed /usr/share/imds-agent"
sh "$S/POSTUN.sh" 0 >/dev/null
[ ! -e /usr/share/imds-agent ] && [ ! -e /usr/share/doc/imds-agent ] ||
  fail "%postun on erase left the empty /usr/share/imds-agent or /usr/share/doc/imds-agent"
mkdir -p /usr/share/imds-agent && touch /usr/share/imds-agent/local-file
sh "$S/POSTUN.sh" 0 >/dev/null
[ -f /usr/share/imds-agent/local-file ] || fail "%postun on erase removed a file it does not own"
INNER
echo "test-rpm: scriptlets OK (user, presets, upgrade and erase)"
