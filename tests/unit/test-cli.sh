#!/usr/bin/env bash
# The command line: --help, --version, bad usage, --print-config (secrets masked), and a bad
# config value stopping start-up with file:line. Usage: test-cli.sh PATH-TO-compute-agent
set -u
agent=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*" >&2; fail=$((fail + 1)); }

out=$("$agent" --help) && grep -q -- '--config-file PATH' <<<"$out" && ok || bad "--help"
out=$("$agent" --version) || bad "--version exit"
for lib in compute-agent librabbitmq jansson libvirt libnbd librados librbd libcurl sqlite; do
    grep -q "^$lib [0-9]" <<<"$out" && ok || bad "--version lacks $lib: $out"
done
"$agent" --no-such-flag >/dev/null 2>&1; [ $? -eq 2 ] && ok || bad "unknown flag must exit 2"
"$agent" stray-arg >/dev/null 2>&1; [ $? -eq 2 ] && ok || bad "stray argument must exit 2"

cat > "$tmp/a.conf" <<'CONF'
[DEFAULT]
host = cli-test
transport_url = rabbit://nova:Very$$Hidden@127.0.0.1:5672/
CONF
printf '[DEFAULT]\nmax_concurrent_snapshots = 7\n' > "$tmp/b.conf"
out=$("$agent" --config-file "$tmp/a.conf" --config-file "$tmp/b.conf" --print-config 2>&1) \
    || bad "--print-config exit: $out"
grep -q '^\[DEFAULT\] host = cli-test$' <<<"$out" && ok || bad "host not printed"
grep -q '^\[DEFAULT\] max_concurrent_snapshots = 7$' <<<"$out" && ok || bad "second file ignored"
grep -q 'rabbit://nova:\*\*\*@127.0.0.1:5672/' <<<"$out" && ok || bad "url not masked: $out"
grep -q "Hidden" <<<"$out" && bad "password printed" || ok

printf '[DEFAULT]\nhost = x\n[libvirt]\nimages_type = lvm\n' > "$tmp/bad.conf"
out=$("$agent" --config-file "$tmp/bad.conf" 2>&1); rc=$?
[ $rc -eq 1 ] && ok || bad "bad config exit $rc"
grep -q "ERROR config: $tmp/bad.conf:4: \[libvirt\] images_type: 'lvm' is not one of" <<<"$out" \
    && ok || bad "bad config message: $out"
out=$("$agent" --config-file "$tmp/missing.conf" 2>&1); rc=$?
[ $rc -eq 1 ] && grep -q "missing.conf: cannot open config file" <<<"$out" && ok \
    || bad "missing file: $rc $out"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
