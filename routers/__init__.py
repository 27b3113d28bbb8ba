"""Reverse-proxy routers as plugins: ``traefik`` and ``caddy`` (run by dockyard or an
operator's), and ``none`` (each deployment on its host port)."""
