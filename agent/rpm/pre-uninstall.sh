# %preun of the imds-agent RPM. $1: 0 on erase, 1 or more on upgrade.
# On erase, what Fedora's %systemd_preun does: disable and stop the units. The
# opt-in IMDS lock-down goes too if it was turned on: its rule and unit are
# files of this package, so it could not outlive the next boot anyway, and
# without the agent it would only cut every application off IMDS. So does the
# opt-in container link (imds-container-link.service) and the container
# endpoint's socket (imds-agent-container.socket), for the same reason.
# The outputs (/var/lib/imds-agent), an edited /etc/sysconfig/imds-agent (kept
# as .rpmsave) and the imds-agent user stay, as Fedora packages leave users.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable imds-agent.service imds-agent.socket >/dev/null 2>&1 || :
    lockdown=no
    if systemctl is-enabled --quiet imds-lockdown.service 2>/dev/null ||
        systemctl is-active --quiet imds-lockdown.service 2>/dev/null; then
        lockdown=yes
        systemctl --no-reload disable imds-lockdown.service >/dev/null 2>&1 || :
    fi
    if [ -d /run/systemd/system ]; then
        systemctl stop imds-agent.socket imds-agent.service >/dev/null 2>&1 || :
        [ "$lockdown" = yes ] && { systemctl stop imds-lockdown.service >/dev/null 2>&1 || :; }
    fi
    [ "$lockdown" = yes ] &&
        echo "imds-agent: the IMDS lock-down (imds-lockdown.service) is off: its files go with the package."
    # The opt-in container link and socket likewise: their units and script
    # are this package's.
    if systemctl is-enabled --quiet imds-agent-container.socket 2>/dev/null ||
        systemctl is-active --quiet imds-agent-container.socket 2>/dev/null; then
        systemctl --no-reload disable imds-agent-container.socket >/dev/null 2>&1 || :
        if [ -d /run/systemd/system ]; then
            systemctl stop imds-agent-container.socket >/dev/null 2>&1 || :
        fi
        echo "imds-agent: the container endpoint's socket (imds-agent-container.socket) is off: its file goes with the package."
    fi
    if systemctl is-enabled --quiet imds-container-link.service 2>/dev/null ||
        systemctl is-active --quiet imds-container-link.service 2>/dev/null; then
        systemctl --no-reload disable imds-container-link.service >/dev/null 2>&1 || :
        if [ -d /run/systemd/system ]; then
            systemctl stop imds-container-link.service >/dev/null 2>&1 || :
        fi
        echo "imds-agent: the container link (imds-container-link.service) is off: its files go with the package."
    fi
fi
exit 0
