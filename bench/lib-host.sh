# Sourced first by bench/hbs-capacity and bench/failover-storm.
#
# Clean-ups: `at_exit command…` registers one; all run, in order, when the script ends (normally, on error, or on
# INT/TERM). Other bench libraries register theirs here rather than setting traps that would replace each other.
#
# Host limits: a tether operator host runs with deploy/sysctl.d/90-tether.conf (socket buffers up to 32 MiB, which
# hbs and hds ask for). As root, the run applies that file for its duration and puts the previous values back at
# exit, so it measures hbs as deployed. HOST_SYSCTL=keep leaves the machine's own limits (Debian's default is
# 208 KiB; this project's machines have 4 MiB). The limits in force are printed either way.
exit_hooks=()
at_exit() { exit_hooks+=("$*"); }
run_exit_hooks() {
    trap - EXIT INT TERM
    local hook
    for hook in "${exit_hooks[@]}"; do eval "$hook" || true; done
}
trap run_exit_hooks EXIT
trap 'exit 130' INT TERM

case "${HOST_SYSCTL:-deploy}" in
    deploy | keep) ;;
    *) echo "HOST_SYSCTL must be deploy (the default) or keep, not '${HOST_SYSCTL}'" >&2; exit 2 ;;
esac
host_conf=deploy/sysctl.d/90-tether.conf
host_keys=$(sed -n 's/^\([a-z0-9_.]*\) *=.*/\1/p' "$host_conf")
if [ "${HOST_SYSCTL:-deploy}" = deploy ] && [ "$(id -u)" -eq 0 ]; then
    host_saved=()
    for key in $host_keys; do host_saved+=("$key=$(sysctl -n "$key")"); done
    at_exit 'sysctl -q -w "${host_saved[@]}" >/dev/null'
    sysctl -q -p "$host_conf" >/dev/null
    host_from="applied from $host_conf until the run ends"
elif [ "${HOST_SYSCTL:-deploy}" = deploy ]; then
    host_from="the machine's own (not root: $host_conf not applied)"
else
    host_from="the machine's own (HOST_SYSCTL=keep)"
fi
echo "host limits: $(for key in $host_keys; do printf '%s=%s ' "$key" "$(sysctl -n "$key")"; done)— $host_from" >&2
