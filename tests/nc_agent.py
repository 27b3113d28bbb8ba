"""The shell handler of the tiny offline agents the evaluation tests and benchmark deploy:
busybox's ``nc -ll -e`` runs it once per connection (busybox's httpd can only run CGI
programs under ``/cgi-bin/``, and agents answer ``/step`` and ``/solve_task`` at the root).

:func:`handler` writes the part every such agent shares: reading one HTTP/1.0 request (its
body in ``$body``), a ``reply STATUS JSON`` function, ``/health`` and the 404; the caller
gives the routes in between.
"""

from __future__ import annotations

_HANDLER = r"""#!/bin/sh
{setup}read -r method path proto
len=0
while read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
  case "$line" in [Cc]ontent-[Ll]ength:*) len=${{line#*: }};; esac
done
body=""
[ "$len" -gt 0 ] && body=$(head -c "$len")
reply() {{
  printf 'HTTP/1.0 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n' "$1" "${{#2}}"
  printf 'Connection: close\r\n\r\n%s' "$2"
}}
case "$path" in
  /health) reply "200 OK" '{{"status":"ok"}}' ;;
{routes}  *) reply "404 Not Found" '{{"error":"not found"}}' ;;
esac
"""


def handler(routes: str, *, setup: str = "") -> str:
    """The script: ``setup`` (shell lines run first), then one request answered by
    ``routes`` (``case`` arms, each line ending in a newline) or ``/health`` or a 404."""
    return _HANDLER.format(setup=setup, routes=routes)
