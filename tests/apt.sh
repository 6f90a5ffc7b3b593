# Sourced by the fetch scripts (tests/vm/fetch.sh, tests/tools/fetch.sh):
# Debian packages fetched with apt's download and unpacked with dpkg -x into
# a cache folder; nothing is installed system-wide. The caller sets WORK (the
# cache folder) and defines say().

# The mirror comes from this machine's own apt sources, never from this file.
mirror() {
    local uri
    uri=$(grep -hoE '^URIs: *[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
    if [ -z "$uri" ]; then
        uri=$(grep -hoE '^deb +[^ ]+/debian/? ' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')
    fi
    [ -n "$uri" ] || { say "cannot find a Debian mirror in /etc/apt"; exit 1; }
    echo "${uri%/}"
}

# apt-get (or apt-cache, with TOOL=apt-cache) with a private state folder
# and one source list: SUITE on the mirror, for the machine's architecture
# or ARCH (arm64: packages for the aarch64 guest).
private_apt() {
    local suite=$1; shift
    local tool=${TOOL:-apt-get}
    local dir="$WORK/apt-$suite${ARCH:+-$ARCH}"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/parts"
    if [ ! -f "$dir/sources.list" ]; then
        echo "deb $(mirror) $suite main" > "$dir/sources.list"
    fi
    local opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=$dir/parts"
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "APT::Get::List-Cleanup=0")
    if [ -n "${ARCH:-}" ]; then
        opts+=(-o "APT::Architecture=$ARCH" -o "APT::Architectures=$ARCH")
    fi
    if [ ! -f "$dir/updated" ]; then
        say "apt update ($suite${ARCH:+, $ARCH}, private lists)"
        apt-get "${opts[@]}" update -qq >&2
        touch "$dir/updated"
    fi
    "$tool" "${opts[@]}" "$@"
}

download_unpack() { # SUITE DEST PACKAGE...
    local suite=$1 dest=$2; shift 2
    local debs="$WORK/debs-$suite${ARCH:+-$ARCH}"
    mkdir -p "$debs" "$dest"
    # apt's sandbox user cannot write into our folder; quiet its warning.
    (cd "$debs" && private_apt "$suite" -o APT::Sandbox::User=root download -qq "$@" >&2)
    for pkg in "$@"; do
        for deb in "$debs"/"${pkg%%=*}"_*.deb; do
            dpkg -x "$deb" "$dest"
        done
    done
}

