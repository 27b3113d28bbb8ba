"""Built-in flows shipped as ordinary plugins: the SQLite state store today."""
