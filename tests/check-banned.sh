#!/usr/bin/env bash
# House rule: no sprintf, strcpy, strcat, strtok, atoi, system or popen in the project's C code
# (unbounded writes, hidden state, lost errors, shell injection). Run from the source top.
set -u
pattern='\b(sprintf|vsprintf|strcpy|strcat|strtok|atoi|system|popen)[[:space:]]*\('
files=$(git ls-files '*.c' '*.h' 2>/dev/null || find . -name '*.[ch]' -not -path './build/*')
[ -n "$files" ] || files=$(find . -name '*.[ch]' -not -path './build/*')
hits=$(grep -nE "$pattern" $files 2>/dev/null | grep -vE '^\S+:[0-9]+:\s*(/\*|\*)' || true)
n=$(echo "$files" | wc -w)
if [ -n "$hits" ]; then
    echo "banned functions used:"
    echo "$hits"
    echo "0 passed, 1 failed"
    exit 1
fi
echo "checked $n files"
echo "1 passed, 0 failed"
