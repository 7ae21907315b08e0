# Helpers shared by the project's scripts. Sourced, not run.

# Each step says how long the script has run, so a slow step shows in any log.
step() { printf '\n==> %s   [%dm%02ds]\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)); }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# Installs the Debian packages that are missing, and only those.
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "installing: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "already installed: $*"
    fi
}

ensure_rust_components() {
    local need=()
    cargo fmt --version >/dev/null 2>&1 || need+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || need+=(clippy)
    if ((${#need[@]})); then
        rustup component add "${need[@]}"
    fi
}

# cargo-deny checks the dependency policy in deny.toml. Built from crates.io once, then reused.
CARGO_DENY_VERSION=0.20.2
ensure_cargo_deny() {
    if cargo deny --version 2>/dev/null | grep -q " ${CARGO_DENY_VERSION}\$"; then
        echo "cargo-deny ${CARGO_DENY_VERSION} present"
    else
        echo "building cargo-deny ${CARGO_DENY_VERSION} (once; a few minutes)"
        cargo install --locked --quiet "cargo-deny@${CARGO_DENY_VERSION}"
    fi
}

# ring must never be built. Cargo.lock still names it because rustls-webpki declares a weak
# optional feature (`ring?/alloc`) and cargo records such packages in the lock file even when no
# feature enables them; what matters is that no build of ours includes it.
check_no_ring() {
    if cargo tree --workspace --target all -e normal,build,dev -i ring 2>/dev/null | grep -q ring; then
        echo "error: ring is in the dependency graph:" >&2
        cargo tree --workspace --target all -e normal,build,dev -i ring >&2
        return 1
    fi
    echo "ring: not in the dependency graph"
}

# A PyPI tool, pinned, in its own virtual environment under the user's cache (never the source
# tree): ensure_pip_tool NAME VERSION VARIABLE installs NAME==VERSION once and exports VARIABLE
# as the path of its command.
ensure_pip_tool() {
    local name=$1 version=$2 var=$3
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/tlsgate/${name}-${version}"
    if [[ ! -x "$venv/bin/$name" ]]; then
        echo "installing $name $version into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "${name}==${version}"
    else
        echo "$name $version present"
    fi
    export "$var=$venv/bin/$name"
}

# sslyze for the TLS-policy scanner tests (TLSGATE_SSLYZE).
SSLYZE_VERSION=6.3.1
ensure_sslyze() { ensure_pip_tool sslyze "$SSLYZE_VERSION" TLSGATE_SSLYZE; }

# schemathesis fuzzes the management API from the OpenAPI document the server serves
# (mgmt/tests/api_schemathesis.rs; TLSGATE_SCHEMATHESIS).
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() { ensure_pip_tool schemathesis "$SCHEMATHESIS_VERSION" TLSGATE_SCHEMATHESIS; }

# cargo-deb builds the Debian package (scripts/package.sh). Built from crates.io once, then reused.
CARGO_DEB_VERSION=3.8.0
ensure_cargo_deb() {
    if cargo deb --version 2>/dev/null | grep -q "${CARGO_DEB_VERSION}"; then
        echo "cargo-deb ${CARGO_DEB_VERSION} present"
    else
        echo "building cargo-deb ${CARGO_DEB_VERSION} (once; a few minutes)"
        cargo install --locked --quiet "cargo-deb@${CARGO_DEB_VERSION}"
    fi
}
