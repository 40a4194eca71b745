#!/usr/bin/env bash
# Builds the chart's two images on this machine, without a Docker engine:
#   egressguard/egressguard-operator   /usr/local/bin/egressguard-operator, user 65532, cmd run
#   egressguard/node-shaper            /usr/local/bin/node-shaper, cmd run
# from the release binaries built static (glibc, -C target-feature=+crt-static: the
# images hold nothing else, where the Dockerfiles copy a dynamic binary onto
# distroless/cc), plus the pod sandbox image egressguard/pause (tests/node/pause).
# Reproducible: the same sources give the same digests (paths remapped, no debug
# info, one layer with fixed owners and times; see tests/node/egimage).
#
#   scripts/build-images.sh [--push REGISTRY] [--tag TAG]...
#
# Prints one line per image and tag: `REFERENCE DIGEST BYTES` (compressed size).
# Without --push the images are only built and their digests printed.
# The static binaries go to target/x86_64-unknown-linux-gnu/release.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "build-images: $*" >&2; exit 1; }

registry="" tags=()
while (($#)); do
  case "$1" in
    --push) registry="${2:?--push needs a registry host:port}"; shift 2 ;;
    --tag) tags+=("${2:?--tag needs a tag}"); shift 2 ;;
    *) die "unknown argument $1 (usage: $0 [--push REGISTRY] [--tag TAG]...)" ;;
  esac
done
if [[ -n "$registry" ]]; then
  # The registries here are test registries on an address of this network
  # namespace (dev-cluster.sh's bridge) or loopback: refuse any other, so a
  # push run from the wrong namespace never leaves through the machine's uplink.
  host="${registry%:*}"
  [[ $host == 127.* || $host == localhost ]] || ip -o -4 addr show | grep -q " inet $host/" ||
    die "--push $registry: $host is not an address of this network namespace (run this where the registry listens, e.g. dev-cluster.sh's namespace)"
fi
version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/egressguard/Chart.yaml")"
[[ -n "$version" ]] || die "no appVersion in charts/egressguard/Chart.yaml"
((${#tags[@]})) || tags=("$version")

node="$("$root/scripts/build-node.sh")"
# --target keeps crt-static off build scripts and proc macros (which cannot be
# static) and the binaries apart from target/release. Paths are remapped so a
# clone elsewhere builds the same bytes.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
# Called from a test, cargo's variables for the test binary (CARGO_PKG_*,
# CARGO_MANIFEST_DIR, ...) would change the build's fingerprint and rebuild
# everything: the images come from the same build whoever asks.
for v in $(compgen -e); do
  case $v in CARGO_HOME | RUSTUP_HOME | RUSTUP_TOOLCHAIN) ;; CARGO* | RUST*) unset "$v" ;; esac
done
start=$SECONDS
(
  cd "$root"
  RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$root=/src --remap-path-prefix=$cargo_home=/cargo" \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --quiet --release --locked --target x86_64-unknown-linux-gnu \
    -p node-shaper -p egressguard-operator --bins
) || die "cargo build failed (see above)"
echo "build-images: static binaries ready in $((SECONDS - start)) s" >&2
out="$root/target/x86_64-unknown-linux-gnu/release"
for b in node-shaper egressguard-operator; do
  ! ldd "$out/$b" 2>&1 | grep -q "=>" || die "$out/$b is not static: $(ldd "$out/$b" 2>&1)"
done

image() { # NAME EGIMAGE-ARGS...
  local name=$1 tag
  shift
  for tag in "${tags[@]}"; do
    local ref="egressguard/$name:$tag" push=()
    if [[ -n "$registry" ]]; then
      ref="$registry/$ref"
      push=(--push "$ref")
    fi
    local built
    built="$("$node/egimage" build "$@" "${push[@]}")" || die "egimage build of $ref failed (see above)"
    echo "$ref $built"
  done
}
image egressguard-operator --file "$out/egressguard-operator:/usr/local/bin/egressguard-operator" \
  --entrypoint /usr/local/bin/egressguard-operator --cmd run --user 65532
image node-shaper --file "$out/node-shaper:/usr/local/bin/node-shaper" \
  --entrypoint /usr/local/bin/node-shaper --cmd run
# The sandbox image has a version of its own.
tags=(1)
image pause --file "$node/pause:/pause" --entrypoint /pause --user 65535
