"""Reverse-proxy routers (Traefik, Caddy, none) as plugins. Arriving with the routers issue."""
