#!/usr/bin/env bash
# Entry point for the real services the agent talks to, all on loopback, all from Debian packages.
#
#   deploy/services.sh up [--all | SERVICE...]   install (if needed), start, health-check
#   deploy/services.sh down [SERVICE...]         stop what deploy/ started (default: all, reverse order)
#   deploy/services.sh status [SERVICE...]       one line per service
#   deploy/services.sh check [SERVICE...]        health-check only; non-zero if any is down
#
# Services: rabbitmq ceph libvirt glance rbd-guest (up --all starts them in this order: glance uses the rbd
# store only when ceph is up). State lives under $CA_DEPLOY_DIR (default /var/tmp/compute-agent).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

ALL=(rabbitmq ceph libvirt glance rbd-guest)

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }

[ $# -ge 1 ] || usage
cmd=$1; shift
if [ $# -eq 0 ] || [ "${1:-}" = --all ]; then
    names=("${ALL[@]}")
else
    names=("$@")
fi
for n in "${names[@]}"; do
    [ -x "$here/services/$n.sh" ] || die "unknown service '$n' (known: ${ALL[*]})"
done

rc=0
case "$cmd" in
    up)
        "$here/install-packages.sh" services
        for n in "${names[@]}"; do
            t0=$(svc_time_ms)
            "$here/services/$n.sh" start
            "$here/services/$n.sh" check || die "$n failed its health check"
            log "$n up in $(( $(svc_time_ms) - t0 )) ms"
        done
        ;;
    down)
        for ((i = ${#names[@]} - 1; i >= 0; i--)); do
            "$here/services/${names[i]}.sh" stop || rc=1
        done
        ;;
    status)
        for n in "${names[@]}"; do "$here/services/$n.sh" status || true; done
        ;;
    check)
        for n in "${names[@]}"; do "$here/services/$n.sh" check || rc=1; done
        ;;
    *) usage ;;
esac
exit $rc
