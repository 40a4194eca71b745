# The cache key of a Go module's build (sourced by scripts/build-*.sh): a hash
# of go.mod, go.sum and every .go file, each named, in a stable order.
module_key() { # MODULE_DIR
  (
    cd "$1"
    for f in go.mod go.sum $(find . -name '*.go' -type f | LC_ALL=C sort); do
      printf '%s\n' "$f"
      cat "$f"
    done
  ) | sha256sum | cut -c1-16
}
