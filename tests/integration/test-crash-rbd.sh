#!/usr/bin/env bash
# kill -9 at every journaled step of a rbd snapshot job, restart, nothing left (crash-points.sh).
CA_CRASH_PATHS=rbd exec "$(dirname "$0")/crash-points.sh" "$@"
