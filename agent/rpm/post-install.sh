# %post of the imds-agent RPM. $1: 1 on first install, 2 or more on upgrade.
# What Fedora's %systemd_post does, written out (cargo generate-rpm takes the
# scriptlet text, not spec macros): on first install only, `systemctl preset`
# the units, which /usr/lib/systemd/system-preset/50-imds-agent.preset says to
# enable; nothing is started (configure /etc/sysconfig/imds-agent, then
# `systemctl start imds-agent`, or reboot). An upgrade keeps the admin's choice.
# Then reload systemd so it sees the new or changed units.
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset imds-agent.service imds-agent.socket >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
