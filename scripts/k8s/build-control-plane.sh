#!/usr/bin/env bash
# Builds the Kubernetes 1.20.2 control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler) from Debian's source package, for the tests' real API server
# (sloserve/devcluster). No containers needed: the binaries are plain Go programs.
#
# Only the three binaries are kept, in a cache folder keyed by version:
#   ${SLOSERVE_CACHE:-$HOME/.cache/sloserve}/kubernetes/v1.20.2/bin/
# A run with the binaries already there returns at once. The 2.3 GB build tree is deleted
# afterwards, even on failure. Takes about 4 minutes on 2 cores; needs root (or sudo) only
# to install the Debian packages when they are missing.
set -euo pipefail

KUBE_VERSION=v1.20.2
# Debian bookworm's kubernetes source package carries 1.20.2 under a 1.20.5 version number.
DEBIAN_SOURCE_VERSION=1.20.5+really1.20.2-1.1+deb12u1
# What sloserve/devcluster runs with (etcd, and openssl for its keys), and the build tools.
RUNTIME_PACKAGES=(etcd-server openssl)
BUILD_PACKAGES=(golang-go rsync make golang-github-modern-go-reflect2-dev)
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

CACHE_ROOT=${SLOSERVE_CACHE:-$HOME/.cache/sloserve}
BIN_DIR=$CACHE_ROOT/kubernetes/$KUBE_VERSION/bin

log() { echo "build-control-plane: $*" >&2; }

binaries_present() {
    local name
    for name in "${BINARIES[@]}"; do
        [[ -x $BIN_DIR/$name ]] || return 1
    done
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        log "need root to run: $*"
        exit 1
    fi
}

package_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

deb_src_configured() {
    grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/
}

# `apt-get source` needs deb-src entries; derive them from the machine's own Debian sources so
# they point at the same mirror and suites (including bookworm-security, where the
# +deb12u1 source lives).
add_deb_src() {
    local deb822=/etc/apt/sources.list.d/debian.sources
    if [[ -f $deb822 ]]; then
        sed -E 's/^Types:.*/Types: deb-src/' "$deb822" \
            | as_root tee /etc/apt/sources.list.d/sloserve-deb-src.sources >/dev/null
    elif [[ -f /etc/apt/sources.list ]]; then
        grep -E '^deb ' /etc/apt/sources.list | sed -E 's/^deb /deb-src /' \
            | as_root tee /etc/apt/sources.list.d/sloserve-deb-src.list >/dev/null
    else
        log "no Debian sources file to derive deb-src entries from"
        exit 1
    fi
}

apt_updated=false
apt_update() {
    if ! $apt_updated; then
        as_root apt-get update -qq
        apt_updated=true
    fi
}

install_missing() {
    local package missing=()
    for package in "$@"; do
        package_installed "$package" || missing+=("$package")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt_update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}"
    fi
}

install_missing "${RUNTIME_PACKAGES[@]}"
if binaries_present; then
    log "Kubernetes $KUBE_VERSION binaries already in $BIN_DIR"
    exit 0
fi
install_missing "${BUILD_PACKAGES[@]}"
if ! deb_src_configured; then
    log "adding deb-src entries"
    add_deb_src
    apt_updated=false
fi
apt_update

BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sloserve-k8s-build.XXXXXX")
trap 'rm -rf "$BUILD_DIR"' EXIT
started=$SECONDS

log "downloading kubernetes $DEBIAN_SOURCE_VERSION source into $BUILD_DIR"
(cd "$BUILD_DIR" && apt-get source --download-only -qq "kubernetes=$DEBIAN_SOURCE_VERSION")
orig=$(find "$BUILD_DIR" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' | head -n 1)
[[ -n $orig ]] || { log "no orig tarball downloaded"; exit 1; }
TREE=$BUILD_DIR/kubernetes
mkdir -p "$TREE"
tar -xf "$orig" -C "$TREE" --strip-components=1

# Vendored reflect2 1.0.1 makes Go >= 1.18 crash the API server on the first custom-resource
# write ("fatal error: fault" in mapiterinit); Debian's 1.0.2 is fixed. Its go.mod must go, or
# GOPATH mode treats it as a module root.
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
[[ -d $reflect2 ]] || { log "missing $reflect2"; exit 1; }
rsync -a --delete "$reflect2/" "$TREE/vendor/github.com/modern-go/reflect2/"
rm -f "$TREE/vendor/github.com/modern-go/reflect2/go.mod"

# GOPATH mode through the tree's own Makefile, as Debian's rules do: module mode wants go.mod
# updates, and a plain `go build` misses the generated openapi code.
mkdir -p "$TREE/.go/src/k8s.io"
ln -s "$TREE" "$TREE/.go/src/k8s.io/kubernetes"
log "building ${BINARIES[*]} (about 3.5 minutes on 2 cores)"
(
    cd "$TREE/.go/src/k8s.io/kubernetes"
    export GOPATH=$TREE/.go GOCACHE=$BUILD_DIR/go-cache GO111MODULE=off CGO_ENABLED=0
    export KUBE_GIT_VERSION=$KUBE_VERSION KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
)

# Install atomically: a half-copied folder must never look like a complete cache.
staging=$BIN_DIR.partial.$$
rm -rf "$staging"
mkdir -p "$staging"
for name in "${BINARIES[@]}"; do
    built=$(find "$TREE/_output" -type f -name "$name" -perm -u+x | head -n 1)
    [[ -n $built ]] || { log "build produced no $name"; exit 1; }
    cp "$built" "$staging/$name"
done
rm -rf "$BIN_DIR"
mv "$staging" "$BIN_DIR"
log "built in $((SECONDS - started)) s; binaries in $BIN_DIR"
"$BIN_DIR/kube-apiserver" --version >&2
