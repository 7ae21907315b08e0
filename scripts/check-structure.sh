#!/usr/bin/env bash
# Structure checks that clippy does not make (issue 12, "One way through the code"):
#
# 1. No Rust source file over MAX_LINES lines (fails, naming each file). Small files are split
#    by state machine or concern long before they get there (STYLE.md, "Small files").
# 2. Import cycles between the top-level modules of one crate: module A's files naming
#    `crate::B` (in a `use` or a path) while B's name `crate::A`, directly or through others.
#    Each cycle (a strongly connected group of modules) is printed on one line and fails the
#    check; STRUCTURE_CYCLES=warn reports them without failing (while one is being taken apart).
#
# Usage: scripts/check-structure.sh        (from anywhere; bash, find, awk)
# Environment:
#   STRUCTURE_MAX_LINES=800     the line limit
#   STRUCTURE_CYCLES=fail|warn  what a cycle does (default fail)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

max_lines=${STRUCTURE_MAX_LINES:-800}
cycles_mode=${STRUCTURE_CYCLES:-fail}

# Every .rs file of the repository, build outputs and VCS data left out.
rust_files() {
    find . \( -path ./target -o -path ./fuzz/target -o -path ./.git \) -prune -o \
        -type f -name '*.rs' -print | sed 's|^\./||' | LC_ALL=C sort
}

status=0

# ---- 1. file length ----
too_long=0
while IFS= read -r f; do
    n=$(wc -l <"$f")
    if ((n > max_lines)); then
        echo "error: $f has $n lines (limit $max_lines): split it along a seam (a state machine, a concern)" >&2
        too_long=$((too_long + 1))
    fi
done < <(rust_files)
if ((too_long)); then
    status=1
else
    echo "file length: every .rs file has at most $max_lines lines"
fi

# ---- 2. import cycles between top-level modules ----
# A crate is a directory with Cargo.toml and src/lib.rs or src/main.rs. Its top-level modules are
# src/NAME.rs and src/NAME/ (lib.rs, main.rs and bin/ are the root, not modules). Comment lines
# and everything after a top-level `#[cfg(test)]` (unit tests at the end of a file), and files
# named tests.rs or under a tests/ directory, are not counted: a test module may reach anywhere.
crate_edges() {
    local src=$1 f rel module
    while IFS= read -r f; do
        rel=${f#"$src"/}
        case $rel in
        lib.rs | main.rs | bin/*) continue ;;
        */tests/* | tests/* | */tests.rs) continue ;;
        esac
        module=${rel%%/*}
        module=${module%.rs}
        awk -v from="$module" '
            /^#\[cfg\(test\)\]/ { exit }
            /^[[:space:]]*\/\// { next }
            {
                line = $0
                # crate::name and crate::{a, b::c, ...} (a group may span lines)
                while (match(line, /crate::[a-z_][a-z0-9_]*/)) {
                    print from, substr(line, RSTART + 7, RLENGTH - 7)
                    line = substr(line, RSTART + RLENGTH)
                }
                # In a group only the names at its first level are modules: crate::{a, b::{c}}
                # names a and b. depth > 0 while inside one; expect: a name may start here.
                text = $0
                if (!depth) {
                    if (!match(text, /crate::\{/)) next
                    text = substr(text, RSTART + RLENGTH); depth = 1; expect = 1
                }
                for (i = 1; i <= length(text) && depth; i++) {
                    c = substr(text, i, 1)
                    if (c == "{") { depth++ }
                    else if (c == "}") { depth--; if (!depth && match(substr(text, i + 1), /crate::\{/)) { text = substr(text, i + 1 + RSTART + RLENGTH - 1); i = 0; depth = 1; expect = 1 } }
                    else if (c == ",") { if (depth == 1) expect = 1 }
                    else if (depth == 1 && expect && c ~ /[a-z_]/) {
                        match(substr(text, i), /^[a-z_][a-z0-9_]*/)
                        print from, substr(text, i, RLENGTH)
                        i += RLENGTH - 1; expect = 0
                    }
                    else if (c !~ /[[:space:]]/) { if (depth == 1) expect = 0 }
                }
            }' "$f"
    done < <(find "$src" -type f -name '*.rs' | LC_ALL=C sort)
}

# Reads "from to" edges; prints each group of modules that reach one another, one per line.
cycles_of() {
    awk -v mods="$1" '
        BEGIN { n = split(mods, m, " "); for (i = 1; i <= n; i++) known[m[i]] = 1 }
        $1 != $2 && ($2 in known) && ($1 in known) { r[$1, $2] = 1; d[$1, $2] = 1 }
        END {
            for (k = 1; k <= n; k++)
                for (i = 1; i <= n; i++)
                    if (r[m[i], m[k]])
                        for (j = 1; j <= n; j++)
                            if (r[m[k], m[j]]) r[m[i], m[j]] = 1
            for (i = 1; i <= n; i++) {
                if (done[m[i]] || !r[m[i], m[i]]) continue
                group = m[i]; done[m[i]] = 1; split("", in_group); in_group[m[i]] = 1
                for (j = i + 1; j <= n; j++)
                    if (r[m[i], m[j]] && r[m[j], m[i]]) {
                        group = group " <-> " m[j]; done[m[j]] = 1; in_group[m[j]] = 1
                    }
                edges = ""
                for (a = 1; a <= n; a++)
                    for (b = 1; b <= n; b++)
                        if ((m[a] in in_group) && (m[b] in in_group) && d[m[a], m[b]])
                            edges = edges (edges == "" ? "" : ", ") m[a] " -> " m[b]
                print group " (" edges ")"
            }
        }'
}

cycle_count=0
while IFS= read -r manifest; do
    dir=$(dirname "$manifest")
    src=$dir/src
    [[ -f $src/lib.rs || -f $src/main.rs ]] || continue
    modules=$(find "$src" -mindepth 1 -maxdepth 1 \( -name '*.rs' -o -type d \) -printf '%f\n' |
        sed 's/\.rs$//' | { grep -vxE 'lib|main|bin|tests' || true; } | LC_ALL=C sort -u | tr '\n' ' ')
    [[ -n $modules ]] || continue
    crate=${dir#./}
    found=$(crate_edges "$src" | cycles_of "$modules")
    if [[ -n $found ]]; then
        while IFS= read -r group; do
            if [[ $cycles_mode == fail ]]; then
                echo "error: import cycle in $crate: $group" >&2
            else
                echo "warning: import cycle in $crate: $group"
            fi
            cycle_count=$((cycle_count + 1))
        done <<<"$found"
    fi
done < <(find . \( -path ./target -o -path ./fuzz/target -o -path ./.git \) -prune -o \
    -name Cargo.toml -print | LC_ALL=C sort)

if ((cycle_count == 0)); then
    echo "import cycles: none between the top-level modules of any crate"
elif [[ $cycles_mode == fail ]]; then
    echo "error: $cycle_count import cycle(s): move what both sides need into a module of its own (STRUCTURE_CYCLES=warn only reports them)" >&2
    status=1
else
    echo "import cycles: $cycle_count (reported only: STRUCTURE_CYCLES=warn)"
fi

exit "$status"
