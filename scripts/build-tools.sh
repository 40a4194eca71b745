#!/usr/bin/env bash
# Builds the command-line tools the tests drive from the Go module tests/tools,
# through the Go module proxy:
#   helm     the real Helm CLI, helm.sh/helm/v4/cmd/helm (v4.3.2, `helm version` says so)
#   kstatus  Kubernetes objects as JSON on stdin -> one line of kstatus per object
#            (sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute)
# into ~/.cache/egressguard/tools/<hash of tests/tools' go.mod, go.sum and *.go>
# (EG_TOOLS_CACHE instead of ~/.cache/egressguard/tools), rebuilt only when those
# files change. Progress goes to stderr; the directory holding both binaries is
# printed on stdout. Concurrent runs are safe: each builds into a temporary
# directory and the first to finish renames it into place.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
module="$root/tests/tools"
# Keep in sync with tests/tools/go.mod.
helm_version=v4.3.2

die() { echo "build-tools: $*" >&2; exit 1; }
log() { echo "build-tools: $*" >&2; }

# shellcheck source=lib/cache.sh
source "$root/scripts/lib/cache.sh"

command -v go >/dev/null || die "go not found: install Go 1.26+ (scripts/install-deps.sh checks for it)"
cache="${EG_TOOLS_CACHE:-$HOME/.cache/egressguard/tools}"
bin="$cache/$(module_key "$module")"
if [[ -x "$bin/helm" && -x "$bin/kstatus" ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/build.XXXXXX")"
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
log "building helm $helm_version and kstatus from Go modules (tests/tools)"
log "(the first build compiles ~1,000 packages: a few minutes on 2 cores, plus module downloads)"
start=$SECONDS
# As helm's Makefile sets them for a release tag (the module proxy carries no
# git commit, so gitCommit stays empty).
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version"
ldflags+=" -X helm.sh/helm/v4/internal/version.metadata="
ldflags+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
# -v names each package as it compiles: turn that into a progress line. No VCS
# stamp: the cache key is the module's files, not the working tree's state.
(cd "$module" && CGO_ENABLED=0 go build -v -trimpath -buildvcs=false -ldflags "$ldflags" -o "$tmp/" \
    helm.sh/helm/v4/cmd/helm ./kstatus) 2>&1 |
  awk '/^(#|go: |.*\.go:)/ { print > "/dev/stderr"; next }
       { n++; if (n % 200 == 0) printf "build-tools:   %d packages compiled\n", n > "/dev/stderr" }' ||
  die "build failed (see above)"
[[ -x "$tmp/helm" && -x "$tmp/kstatus" ]] || die "build failed (see above)"
"$tmp/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$helm_version" ||
  die "the built helm does not report $helm_version: $("$tmp/helm" version 2>&1 || true)"
# Atomic: a concurrent run may have finished first (then its copy stays: the
# same build); an incomplete directory left by hand is moved aside first.
if ! mv -T "$tmp" "$bin" 2>/dev/null && [[ ! (-x "$bin/helm" && -x "$bin/kstatus") ]]; then
  stale="$(mktemp -d "$cache/stale.XXXXXX")"
  mv -T "$bin" "$stale/old" 2>/dev/null || true
  rm -rf "$stale"
  mv -T "$tmp" "$bin" 2>/dev/null || [[ -x "$bin/helm" && -x "$bin/kstatus" ]] ||
    die "could not move the build into $bin"
fi
log "built in $((SECONDS - start)) s: $bin"
echo "$bin"
