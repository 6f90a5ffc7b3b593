#!/usr/bin/env bash
# Checks the .rpm and .deb packages that dist/build made, as an operator
# would meet them:
#
#   tests/packages.sh [DIR]     DIR: dist/build's output (target/packages)
#
# For every package found (each architecture built):
# - its file list (rpm -qlp, dpkg-deb -c, with modes) is exactly the expected
#   list below, and none of its paths is one that AWS's
#   aws-nitro-enclaves-cli package owns or writes (the list below, from its
#   public spec file); the configuration is marked as such; no maintainer
#   scripts (installing starts nothing);
# - it installs into a scratch root (dpkg --root, rpm --root --nodeps); the
#   installed binaries run (--version, --help; another architecture's under
#   qemu-user); the installed unit passes systemd-analyze verify; an edited
#   configuration survives a reinstall;
# - lintian and rpmlint find no errors;
# - every installed manual page renders without a warning (man --warnings);
#   the installed bash completion, sourced in a bash, completes the
#   subcommands, and equals what `vsock-relay completions bash` prints.
#
# Missing tools are installed with apt (root); a check that cannot run
# fails. The last line says PASSED or FAILED with the failed checks; the
# exit status is non-zero then. Never opens an AF_VSOCK socket: the
# binaries run only --version, --help and completions.
set -uo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-$PWD/target}")
DIR=$(realpath -m "${1:-$TARGET_DIR/packages}")
export VSOCK_RELAY_NO_VSOCK=1 SYSTEMD_LOG_COLOR=0
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)

failed=()
say() { printf '[packages] %s\n' "$*"; }
fail() { printf '[packages] FAIL: %s\n' "$*"; failed+=("$1"); }

# What both formats install: mode and path of every file (directories
# aside). Manual pages: vsock-relay, each subcommand, the drop-in proxy.
EXPECTED_COMMON="
-rwxr-xr-x /usr/bin/vsock-relay
-rwxr-xr-x /usr/libexec/vsock-relay/vsock-proxy
-rw-r--r-- /usr/lib/systemd/system/vsock-relay-proxy@.service
-rw-r--r-- /etc/vsock-relay/default.yaml
-rw-r--r-- /etc/vsock-relay/default.env
-rw-r--r-- /usr/share/bash-completion/completions/vsock-relay
-rw-r--r-- /usr/share/fish/vendor_completions.d/vsock-relay.fish
-rw-r--r-- /usr/share/man/man1/vsock-relay.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-proxy.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-forward.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-dns.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-serve.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-client.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-demo.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-bench.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-bench-sink.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-bench-bulk.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-bench-rpc.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-bench-churn.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-bench-dns.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-bench-idle.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-bench-burst.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-relay.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-doctor.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-completions.1.gz
-rw-r--r-- /usr/share/man/man1/vsock-relay-vsock-proxy.1.gz
"
EXPECTED_RPM="
-rw-r--r-- /usr/share/zsh/site-functions/_vsock-relay
-rw-r--r-- /usr/share/licenses/vsock-relay/LICENSE
"
EXPECTED_DEB="
-rw-r--r-- /usr/share/zsh/vendor-completions/_vsock-relay
-rw-r--r-- /usr/share/doc/vsock-relay/copyright
-rw-r--r-- /usr/share/doc/vsock-relay/changelog.Debian.gz
-rw-r--r-- /usr/share/lintian/overrides/vsock-relay
"
CONFIG="/etc/vsock-relay/default.env
/etc/vsock-relay/default.yaml"

# Every path aws-nitro-enclaves-cli (and its -devel and -integration-tests
# packages) installs or writes, from the %files lists and scriptlets of
# SPECS/aws-nitro-enclaves-cli.spec in github.com/aws/aws-nitro-enclaves-cli
# (1.4.2), %{_unitdir} on both /usr/lib and /lib. A path ending in / is a
# folder: nothing of ours may be in it.
AWS_PATHS="
/usr/bin/nitro-cli
/usr/bin/vsock-proxy
/usr/bin/nitro-enclaves-allocator
/usr/bin/run-nitro-cli-integration-tests
/usr/lib/systemd/system/nitro-enclaves-vsock-proxy.service
/usr/lib/systemd/system/nitro-enclaves-allocator.service
/lib/systemd/system/nitro-enclaves-vsock-proxy.service
/lib/systemd/system/nitro-enclaves-allocator.service
/etc/nitro_enclaves/
/usr/share/nitro_enclaves/
/usr/include/nitro_enclaves/
/usr/share/licenses/aws-nitro-enclaves-cli-1.4.2/
/var/log/nitro_enclaves/
/run/nitro_enclaves/
/usr/lib/tmpfiles.d/nitro_enclaves.conf
/usr/lib/udev/rules.d/99-nitro_enclaves.rules
/usr/lib/modules-load.d/nitro_enclaves.conf
"

# overlap_with_aws < PATHS: prints each path that is AWS's or inside an AWS
# folder (also a versioned licence folder of any release); status 1 if any.
overlap_with_aws() {
    awk -v aws="$AWS_PATHS" '
        BEGIN { n = split(aws, list, "\n") }
        {
            for (i = 1; i <= n; i++) {
                a = list[i]
                if (a == "") continue
                if ($0 == a || $0 "/" == a || (a ~ /\/$/ && index($0, a) == 1)) { print $0 " (AWS: " a ")"; bad = 1 }
            }
            if (index($0, "/usr/share/licenses/aws-nitro-enclaves-cli") == 1) { print $0 " (AWS licence folder)"; bad = 1 }
        }
        END { exit bad }'
}

# need TOOL PACKAGE: TOOL on PATH, installed with apt (root) when missing.
need() {
    command -v "$1" >/dev/null && return 0
    if [ "$(id -u)" = 0 ]; then
        say "installing $2 (apt) for $1"
        apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$2" >/dev/null; }
    fi
    command -v "$1" >/dev/null || { fail "tool" "$1 is missing (Debian package $2) and cannot be installed"; return 1; }
}

# compare NAME EXPECTED GOT: equal as sorted sets, else the difference.
compare() {
    local diff
    diff=$(diff <(sort <<<"$2" | sed '/^$/d') <(sort <<<"$3" | sed '/^$/d'))
    if [ -n "$diff" ]; then
        fail "$1" "differs from the expected list (< expected, > in the package):"
        printf '%s\n' "$diff"
        return 1
    fi
}

# The overlap check must catch an overlap: a check that cannot fail is none.
self_test() {
    local caught
    caught=$(printf '/usr/bin/vsock-proxy\n/etc/nitro_enclaves/vsock-proxy.yaml\n/usr/bin/ours\n' | overlap_with_aws)
    [ "$(wc -l <<<"$caught")" = 2 ] || fail "self-test" "the AWS overlap check missed a planted overlap: $caught"
}

# runs ARCH BINARY ARGS...: runs an installed binary of ARCH, under
# qemu-user when ARCH is not this machine's (installed by the main part).
runs() {
    local arch=$1; shift
    if [ "$arch" = "$(uname -m)" ]; then
        "$@"
    else
        "qemu-$arch" "$@"
    fi
}

# check_installed FORMAT ARCH ROOT: what an installed package must do.
check_installed() {
    local format=$1 arch=$2 root=$3 out
    for bin in usr/bin/vsock-relay usr/libexec/vsock-relay/vsock-proxy; do
        local name=${bin##*/}
        out=$(runs "$arch" "$root/$bin" --version 2>&1) \
            || { fail "$format $arch run" "$bin --version failed: $out"; continue; }
        if ! grep -qx "$name $version" <<<"$out" || ! grep -q "^target: *$arch-unknown-linux-musl$" <<<"$out" \
            || ! grep -q "^commit: " <<<"$out" || ! grep -q "^backends: .*portable" <<<"$out"; then
            fail "$format $arch run" "$bin --version says:"$'\n'"$out"
        else
            say "$format $arch: $bin --version: $(tr '\n' ';' <<<"$out")"
        fi
        out=$(runs "$arch" "$root/$bin" --help 2>&1) && grep -q "^Usage: $name" <<<"$out" \
            || fail "$format $arch run" "$bin --help: $(head -3 <<<"$out")"
    done
    # The installed unit, an instance of it verified with its ExecStart
    # pointing into the scratch root (systemd-analyze --root would look for
    # systemd's own units and /bin/kill there too).
    local units="$WORK/units-$format-$arch" verify rc
    mkdir -p "$units"
    sed "s|/usr/bin/vsock-relay|$root/usr/bin/vsock-relay|g" "$root/usr/lib/systemd/system/vsock-relay-proxy@.service" \
        > "$units/vsock-relay-proxy@.service"
    ln -sf vsock-relay-proxy@.service "$units/vsock-relay-proxy@default.service"
    verify=$(systemd-analyze verify "$units/vsock-relay-proxy@default.service" 2>&1)
    rc=$?
    if [ "$rc" -ne 0 ] || grep -q "vsock-relay-proxy@" <<<"$verify"; then
        fail "$format $arch systemd-analyze" "verify (status $rc):"$'\n'"$verify"
    else
        say "$format $arch: systemd-analyze verify vsock-relay-proxy@default.service: passed, no remarks${verify:+ (on other units: $verify)}"
    fi
    # Manual pages render without a warning.
    local pages=0 warned=0
    for page in "$root"/usr/share/man/man1/vsock-relay*.1.gz; do
        out=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
        pages=$((pages + 1))
        [ -z "$out" ] || { warned=$((warned + 1)); fail "$format $arch man" "${page##*/}: $out"; }
    done
    local listed
    listed=$(grep -c ' /usr/share/man/man1/' <<<"$EXPECTED_COMMON")
    [ "$pages" = "$listed" ] || fail "$format $arch man" "$pages manual pages installed, $listed expected"
    say "$format $arch: $pages manual pages rendered, $warned with warnings"
    # The bash completion completes the subcommands, and is what
    # `completions bash` prints.
    local words
    words=$(bash --norc --noprofile -c '
        source "$1/usr/share/bash-completion/completions/vsock-relay"
        fn=$(complete -p vsock-relay | sed -n "s/.* -F \([^ ]*\) .*/\1/p")
        COMP_WORDS=(vsock-relay ""); COMP_CWORD=1; COMP_LINE="vsock-relay "; COMP_POINT=${#COMP_LINE}
        "$fn" vsock-relay "" vsock-relay
        printf "%s\n" "${COMPREPLY[@]}" | grep -v "^-"' _ "$root")
    compare "$format $arch bash completion" "$(printf '%s\n' proxy forward dns serve client doctor demo bench relay completions help)" "$words" \
        && say "$format $arch: bash completes vsock-relay <Tab> to: $(tr '\n' ' ' <<<"$words")"
    if [ "$arch" = "$(uname -m)" ]; then
        cmp -s <("$root/usr/bin/vsock-relay" completions bash) "$root/usr/share/bash-completion/completions/vsock-relay" \
            || fail "$format $arch completions" "the installed bash completion differs from \`vsock-relay completions bash\`"
    fi
}

# check_config_kept FORMAT ARCH ROOT REINSTALL...: an edited configuration
# survives reinstalling the package.
check_config_kept() {
    local format=$1 arch=$2 root=$3; shift 3
    echo "# edited by the operator" >> "$root/etc/vsock-relay/default.yaml"
    if ! "$@" >/dev/null 2>&1; then
        fail "$format $arch reinstall" "reinstalling failed: $*"
    elif ! tail -1 "$root/etc/vsock-relay/default.yaml" | grep -qx "# edited by the operator"; then
        fail "$format $arch config" "reinstalling overwrote the edited /etc/vsock-relay/default.yaml"
    else
        say "$format $arch: an edited /etc/vsock-relay/default.yaml survives a reinstall"
    fi
}

check_rpm() {
    local pkg=$1 arch
    arch=$(rpm -qp --qf '%{ARCH}' "$pkg" 2>/dev/null)
    say "rpm $arch: ${pkg##*/}"
    local files
    files=$(rpm -qp --qf '[%{FILEMODES:perms} %{FILENAMES}\n]' "$pkg" | grep -v '^d')
    compare "rpm $arch file list" "$EXPECTED_COMMON$EXPECTED_RPM" "$files" \
        && say "rpm $arch: rpm -qlp: $(rpm -qlp "$pkg" | wc -l) entries, $(wc -l <<<"$files") files, as expected"
    rpm -qlp "$pkg" | overlap_with_aws || fail "rpm $arch AWS overlap" "paths of aws-nitro-enclaves-cli (above)"
    compare "rpm $arch config" "$CONFIG" "$(rpm -qcp "$pkg")"
    [ "$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$pkg" | grep -c '^cn /etc/vsock-relay/')" = 2 ] \
        || fail "rpm $arch config" "the configuration is not %config(noreplace)"
    local scripts
    scripts=$(rpm -qp --scripts "$pkg")
    [ -z "$scripts" ] || fail "rpm $arch scripts" "has scriptlets (installing must start nothing): $scripts"
    local root
    root=$(mktemp -d "$WORK/rpm-$arch.XXXX")
    if rpm --root "$root" --initdb && rpm --root "$root" -i --nodeps --ignorearch --noplugins "$pkg"; then
        say "rpm $arch: installed into a scratch root ($(rpm --root "$root" -qa))"
        check_installed rpm "$arch" "$root"
        check_config_kept rpm "$arch" "$root" rpm --root "$root" -U --replacepkgs --nodeps --ignorearch --noplugins "$pkg"
    else
        fail "rpm $arch install" "rpm --root $root -i --nodeps failed"
    fi
    local lint
    lint=$(rpmlint --rpmlintrc dist/rpmlintrc "$pkg" 2>&1)
    local rc=$?
    printf '%s\n' "$lint" | sed 's/^/    /'
    [ "$rc" -eq 0 ] && ! grep -q ': E: ' <<<"$lint" || fail "rpm $arch rpmlint" "rpmlint found errors (status $rc)"
}

check_deb() {
    local pkg=$1 arch
    arch=$(dpkg-deb -f "$pkg" Architecture)
    case "$arch" in amd64) arch=x86_64 ;; arm64) arch=aarch64 ;; esac
    say "deb $arch: ${pkg##*/}"
    local listing files
    listing=$(dpkg-deb -c "$pkg")
    files=$(awk '$1 !~ /^d/ { sub(/^\./, "", $6); print $1, $6 }' <<<"$listing")
    compare "deb $arch file list" "$EXPECTED_COMMON$EXPECTED_DEB" "$files" \
        && say "deb $arch: dpkg-deb -c: $(wc -l <<<"$listing") entries, $(wc -l <<<"$files") files, as expected"
    awk '{ sub(/^\./, "", $6); sub(/\/$/, "", $6); if ($6 != "") print $6 }' <<<"$listing" | overlap_with_aws \
        || fail "deb $arch AWS overlap" "paths of aws-nitro-enclaves-cli (above)"
    local control
    control=$(mktemp -d "$WORK/control.XXXX")
    dpkg-deb -e "$pkg" "$control"
    compare "deb $arch conffiles" "$CONFIG" "$(cat "$control/conffiles" 2>/dev/null)"
    local scripts
    scripts=$(cd "$control" && ls preinst postinst prerm postrm config 2>/dev/null)
    [ -z "$scripts" ] || fail "deb $arch scripts" "has maintainer scripts (installing must start nothing): $scripts"
    local root
    root=$(mktemp -d "$WORK/deb-$arch.XXXX")
    mkdir -p "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/info" && touch "$root/var/lib/dpkg/status"
    if dpkg --root="$root" --force-architecture --force-script-chrootless -i "$pkg" >/dev/null; then
        say "deb $arch: installed into a scratch root ($(dpkg --root="$root" -l vsock-relay | tail -1 | awk '{print $1, $2, $3}'))"
        check_installed deb "$arch" "$root"
        check_config_kept deb "$arch" "$root" dpkg --root="$root" --force-architecture --force-script-chrootless \
            --force-confold -i "$pkg"
    else
        fail "deb $arch install" "dpkg --root $root -i failed"
    fi
    local lint
    lint=$(lintian --fail-on error --allow-root "$pkg" 2>&1)
    local rc=$?
    printf '%s\n' "$lint" | sed 's/^/    /'
    [ "$rc" -eq 0 ] && ! grep -q '^E: ' <<<"$lint" || fail "deb $arch lintian" "lintian found errors (status $rc)"
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
self_test
for tool in "rpm rpm" "rpmlint rpmlint" "lintian lintian" "dpkg-deb dpkg" "systemd-analyze systemd" "man man-db"; do
    need $tool
done
shopt -s nullglob
rpms=("$DIR"/vsock-relay-"$version"-1.*.rpm)
debs=("$DIR"/vsock-relay_"$version"-1_*.deb)
[ ${#rpms[@]} -gt 0 ] || fail "no rpm" "no vsock-relay-$version-1.*.rpm in $DIR (run dist/build)"
[ ${#debs[@]} -gt 0 ] || fail "no deb" "no vsock-relay_$version-1_*.deb in $DIR (run dist/build)"
# Another architecture's binaries run under qemu-user.
for arch in x86_64 aarch64; do
    [ "$arch" = "$(uname -m)" ] && continue
    if printf '%s\n' "${rpms[@]}" "${debs[@]}" | grep -qE "\.$arch\.rpm$|_$([ "$arch" = x86_64 ] && echo amd64 || echo arm64)\.deb$"; then
        need "qemu-$arch" qemu-user
    fi
done
if [ ${#failed[@]} -eq 0 ]; then
    for pkg in "${rpms[@]}"; do check_rpm "$pkg"; done
    for pkg in "${debs[@]}"; do check_deb "$pkg"; done
fi
if [ ${#failed[@]} -eq 0 ]; then
    say "PASSED: ${#rpms[@]} rpm and ${#debs[@]} deb packages"
    exit 0
fi
names=$(printf '%s; ' "${failed[@]}")
say "FAILED: ${names%; }"
exit 1
