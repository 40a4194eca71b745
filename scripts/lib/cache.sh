# The cache key of a Go module's build (sourced by scripts/build-*.sh): a hash
# of go.mod, go.sum and every .go file, each named, in a stable order, then of
# any further FILEs (the build script: its tags, flags and versions).
module_key() { # MODULE_DIR [FILE...]
  local module=$1
  shift
  (
    cd "$module"
    for f in go.mod go.sum $(find . -name '*.go' -type f | LC_ALL=C sort); do
      printf '%s\n' "$f"
      cat "$f"
    done
    for f in "$@"; do
      printf '%s\n' "$(basename "$f")"
      cat "$f"
    done
  ) | sha256sum | cut -c1-16
}
