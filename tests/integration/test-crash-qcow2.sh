#!/usr/bin/env bash
# kill -9 at every journaled step of a qcow2 snapshot job, restart, nothing left (crash-points.sh).
CA_CRASH_PATHS=qcow2 exec "$(dirname "$0")/crash-points.sh" "$@"
