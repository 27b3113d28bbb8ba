"""dockyard's REST API (Litestar) and its command-line interface."""
