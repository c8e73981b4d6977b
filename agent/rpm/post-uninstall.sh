# %postun of the imds-agent RPM. $1: 0 on erase, 1 or more on upgrade.
# Reload systemd (the units changed or are gone). On upgrade, what Fedora's
# %systemd_postun_with_restart does: restart the agent only if it is running,
# so it runs the new binary (its outputs stay in place across the restart).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart imds-agent.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    # cargo generate-rpm cannot list directories, so the package does not own
    # these two: remove them if the erase left them empty.
    rmdir /usr/share/imds-agent /usr/share/doc/imds-agent >/dev/null 2>&1 || :
    echo "imds-agent: removed; its outputs in /var/lib/imds-agent and the imds-agent user are left in place."
fi
exit 0
