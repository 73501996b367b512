# Sourced by tools/demo.sh and tools/test.sh: stops with one clear line where cargo is missing
# or rustc is older than the workspace's rust-version (Cargo.toml), instead of cargo's list
# of every dependency that needs a newer compiler.
need_rust() {
  if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
    echo "turbo-pi needs a Rust toolchain (https://rustup.rs): cargo was not found" >&2
    exit 1
  fi
  local want have
  want=$(sed -n 's/^rust-version = "\([0-9.]*\)"/\1/p' Cargo.toml)
  have=$(rustc --version | awk '{print $2}')
  have=${have%%-*}
  if [ -n "$want" ] && [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]; then
    echo "turbo-pi needs Rust $want or newer (dora-rs 1.1 requires it); rustc $have was found: run \`rustup update\`" >&2
    exit 1
  fi
}
need_rust
