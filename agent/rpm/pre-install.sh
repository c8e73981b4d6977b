# %pre of the imds-agent RPM. $1: 1 on first install, 2 or more on upgrade.
# Creates the imds-agent system user and group the way Fedora packaging does:
# the package ships /usr/lib/sysusers.d/imds-agent.conf, and because that file
# is not on disk yet in %pre, its line is handed to systemd-sysusers on stdin
# with --replace (what systemd's %sysusers_create_package macro expands to).
# Without systemd-sysusers (a container image), the getent/useradd equivalent
# that Fedora's %sysusers_create_compat generates. Never touches an existing user.
sysusers_line='u imds-agent - "EC2 instance-role credentials agent (imds-agent)" / /usr/sbin/nologin'
if [ -x /usr/bin/systemd-sysusers ]; then
    printf '%s\n' "$sysusers_line" |
        /usr/bin/systemd-sysusers --replace=/usr/lib/sysusers.d/imds-agent.conf - ||
        { echo "imds-agent: systemd-sysusers could not create the imds-agent user (see above)" >&2; exit 1; }
else
    getent group imds-agent >/dev/null || groupadd -r imds-agent ||
        { echo "imds-agent: groupadd could not create the imds-agent group (see above)" >&2; exit 1; }
    getent passwd imds-agent >/dev/null ||
        useradd -r -g imds-agent -d / -s /usr/sbin/nologin \
            -c 'EC2 instance-role credentials agent (imds-agent)' imds-agent ||
        { echo "imds-agent: useradd could not create the imds-agent user (see above)" >&2; exit 1; }
fi
exit 0
