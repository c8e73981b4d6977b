# %preun of the imds-agent RPM. $1: 0 on erase, 1 or more on upgrade.
# On erase, what Fedora's %systemd_preun does: disable and stop the units. The
# opt-in IMDS lock-down goes too if it was turned on: its rule and unit are
# files of this package, so it could not outlive the next boot anyway, and
# without the agent it would only cut every application off IMDS. So does the
# opt-in container link (imds-container-link.service) and the container
# endpoint's socket (imds-agent-container.socket), for the same reason.
# The outputs (/var/lib/imds-agent), an edited /etc/sysconfig/imds-agent (kept
# as .rpmsave) and the imds-agent user stay, as Fedora packages leave users.

# turn_off UNIT WHAT FILES: if the opt-in UNIT is enabled or running,
# disable and stop it and say so.
turn_off() {
    if systemctl is-enabled --quiet "$1" 2>/dev/null ||
        systemctl is-active --quiet "$1" 2>/dev/null; then
        systemctl --no-reload disable "$1" >/dev/null 2>&1 || :
        if [ -d /run/systemd/system ]; then
            systemctl stop "$1" >/dev/null 2>&1 || :
        fi
        echo "imds-agent: $2 ($1) is off: $3 with the package."
    fi
}
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable imds-agent.service imds-agent.socket >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl stop imds-agent.socket imds-agent.service >/dev/null 2>&1 || :
    fi
    # After the agent: the lock-down is not lifted while the agent runs.
    turn_off imds-lockdown.service "the IMDS lock-down" "its files go"
    turn_off imds-agent-container.socket "the container endpoint's socket" "its file goes"
    turn_off imds-container-link.service "the container link" "its files go"
fi
exit 0
