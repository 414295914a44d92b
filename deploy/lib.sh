# Shared helpers for deploy/ service scripts. Source it; it defines functions only.
#
# Conventions every service script follows:
#   - its private state lives in "$(svc_dir NAME)" = $CA_DEPLOY_DIR/NAME (default
#     /var/tmp/compute-agent/NAME): data, logs, config, pid files;
#   - every process it starts is recorded with svc_record_pid, and "stop" kills only those PIDs;
#   - facts other scripts and tests need (ports, URLs, keyrings, UUIDs) go into
#     "$(svc_dir NAME)/env" as KEY=VALUE lines (shell-quoted), read back with svc_load_env NAME;
#   - sub-commands: install | start | check | stop | status, each idempotent.

CA_DEPLOY_DIR=${CA_DEPLOY_DIR:-/var/tmp/compute-agent}
CA_DEPLOY_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '%s %s: %s\n' "$(date +%H:%M:%S)" "${SVC:-deploy}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

svc_dir() { printf '%s/%s' "$CA_DEPLOY_DIR" "$1"; }

# svc_record_pid NAME LABEL PID: remember a process this script started.
svc_record_pid() {
    local d; d=$(svc_dir "$1")
    mkdir -p "$d/pids"
    echo "$3" > "$d/pids/$2.pid"
}

# pid_alive PID: true if the process exists and is not a zombie (PID 1 here does not reap, so a
# killed daemon lingers as <defunct> and kill -0 still succeeds).
pid_alive() {
    local pid=$1 state
    [ -n "$pid" ] || return 1
    [ -r "/proc/$pid/stat" ] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != Z ] && [ "$state" != X ]
}

# svc_pid NAME LABEL: print the recorded PID if that process is alive.
svc_pid() {
    local f; f="$(svc_dir "$1")/pids/$2.pid"
    [ -r "$f" ] || return 1
    local pid; pid=$(cat "$f")
    pid_alive "$pid" && echo "$pid"
}

# svc_stop_pid NAME LABEL [TIMEOUT]: SIGTERM the recorded process, SIGKILL after TIMEOUT (10 s).
svc_stop_pid() {
    local name=$1 label=$2 timeout=${3:-10} f pid i
    f="$(svc_dir "$name")/pids/$label.pid"
    [ -r "$f" ] || return 0
    pid=$(cat "$f")
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < timeout * 10; i++)); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then
            log "$label ($pid) ignored SIGTERM for ${timeout}s, killing"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    rm -f "$f"
}

# svc_stop_all NAME: stop every recorded process of a service, most recently started first.
svc_stop_all() {
    local d f; d="$(svc_dir "$1")/pids"
    [ -d "$d" ] || return 0
    for f in $(ls -t "$d"/*.pid 2>/dev/null); do
        svc_stop_pid "$1" "$(basename "$f" .pid)"
    done
}

# svc_spawn NAME LABEL LOGFILE CMD...: start CMD detached in its own session, record its PID.
svc_spawn() {
    local name=$1 label=$2 logf=$3; shift 3
    # The daemon keeps no descriptor of its caller beyond 0-2 (a test runner's output pipe or a
    # flock would otherwise stay open, and held, for the daemon's whole life).
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
        done
        exec setsid "$@" > "$logf" 2>&1 < /dev/null
    ) &
    svc_record_pid "$name" "$label" "$!"
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s until it succeeds or time runs out.
wait_for() {
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    while ! "$@" > /dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# svc_set_env NAME KEY VALUE: record a fact in the service's env file (replacing an older value).
svc_set_env() {
    local f; f="$(svc_dir "$1")/env"
    mkdir -p "$(dirname "$f")"
    touch "$f"
    grep -v "^$2=" "$f" > "$f.tmp" || true
    printf '%s=%q\n' "$2" "$3" >> "$f.tmp"
    mv "$f.tmp" "$f"
}

# svc_load_env NAME: source the service's env file into the caller's shell (no-op if absent).
svc_load_env() {
    local f; f="$(svc_dir "$1")/env"
    # shellcheck disable=SC1090
    [ -r "$f" ] && . "$f"
    return 0
}

# svc_time_ms: monotonic-enough wall clock in milliseconds for start-up timing reports.
svc_time_ms() { date +%s%3N; }

# svc_rss_kb PID...: total resident memory of the given processes, in KiB.
svc_rss_kb() {
    local total=0 pid v
    for pid in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
