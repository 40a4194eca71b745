#!/usr/bin/env bash
# Builds what a test node runs besides the kubelet, from the Go module tests/node
# through the Go module proxy (no other download):
#   containerd, ctr, containerd-shim-runc-v2   containerd v2.4.2 (CRI built in)
#   runc                                       v1.5.3, cgo with libseccomp (RuntimeDefault seccomp)
#   cni/bridge, cni/host-local, cni/loopback   containernetworking/plugins v1.10.0
#   pause                                      the pod sandbox's PID 1 (tests/node/pause)
#   egimage                                    OCI image builder and registry (tests/node/egimage)
# into ~/.cache/egressguard/node/<hash of tests/node's go.mod, go.sum and *.go>
# (EG_NODE_CACHE instead of ~/.cache/egressguard/node), rebuilt only when those
# files change. Progress goes to stderr; the directory is printed on stdout.
# Needs libseccomp-dev and a C compiler (scripts/install-deps.sh installs them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
module="$root/tests/node"
# Keep in sync with tests/node/go.mod.
containerd_version=v2.4.2
runc_version=1.5.3

die() { echo "build-node: $*" >&2; exit 1; }
log() { echo "build-node: $*" >&2; }

# shellcheck source=lib/cache.sh
source "$root/scripts/lib/cache.sh"

built() {
  local b
  for b in containerd ctr containerd-shim-runc-v2 runc cni/bridge cni/host-local cni/loopback pause egimage; do
    [[ -x "$1/$b" ]] || return 1
  done
}

command -v go >/dev/null || die "go not found: install Go 1.26+ (scripts/install-deps.sh checks for it)"
cache="${EG_NODE_CACHE:-$HOME/.cache/egressguard/node}"
bin="$cache/$(module_key "$module" "$root/scripts/build-node.sh")"
if built "$bin"; then
  echo "$bin"
  exit 0
fi
pkg-config --exists libseccomp || die "libseccomp-dev not found (apt-get install libseccomp-dev pkg-config)"
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/build.XXXXXX")"
chmod 755 "$tmp"
mkdir "$tmp/cni"
trap 'rm -rf "$tmp"' EXIT
log "building containerd $containerd_version, runc $runc_version, CNI plugins, pause and egimage from Go modules (tests/node)"
start=$SECONDS
progress() {
  awk -v what="$1" '/^(#|go: |.*\.go:)/ { print > "/dev/stderr"; next }
       { n++; if (n % 200 == 0) printf "build-node:   %s: %d packages compiled\n", what, n > "/dev/stderr" }'
}
go_build() { # WHAT OUT CGO TAGS LDFLAGS PKG...
  local what=$1 out=$2 cgo=$3 tags=$4 ldflags=$5
  shift 5
  (cd "$module" && CGO_ENABLED=$cgo go build -v -trimpath -buildvcs=false -tags "$tags" \
      -ldflags "-s -w $ldflags" -o "$out" "$@") 2>&1 | progress "$what" || die "$what: build failed (see above)"
}
# As containerd's Makefile for a static build without the snapshotters this
# machine cannot use; CRI stays in (never no_cri).
go_build containerd "$tmp/" 0 "no_btrfs no_devmapper urfave_cli_no_docs" \
  "-X github.com/containerd/containerd/v2/version.Version=$containerd_version" \
  github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr
go_build shim "$tmp/" 0 "no_grpc" \
  "-X github.com/containerd/containerd/v2/version.Version=$containerd_version" \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
# runc needs cgo (its nsenter is C) and libseccomp for seccomp profiles.
go_build runc "$tmp/runc" 1 "seccomp urfave_cli_no_docs" "-X main.version=$runc_version" \
  github.com/opencontainers/runc
go_build cni "$tmp/cni/" 0 "" "" \
  github.com/containernetworking/plugins/plugins/main/bridge \
  github.com/containernetworking/plugins/plugins/ipam/host-local \
  github.com/containernetworking/plugins/plugins/main/loopback
go_build tools "$tmp/" 0 "" "" ./pause ./egimage
built "$tmp" || die "build failed (see above)"
"$tmp/runc" --version | grep -q "seccomp" || die "runc was built without seccomp: $("$tmp/runc" --version)"
if ! mv -T "$tmp" "$bin" 2>/dev/null && ! built "$bin"; then
  stale="$(mktemp -d "$cache/stale.XXXXXX")"
  mv -T "$bin" "$stale/old" 2>/dev/null || true
  rm -rf "$stale"
  mv -T "$tmp" "$bin" 2>/dev/null || built "$bin" || die "could not move the build into $bin"
fi
log "built in $((SECONDS - start)) s: $bin"
echo "$bin"
