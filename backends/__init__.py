"""Container runtimes as plugins: Podman (default, rootful or rootless)."""
