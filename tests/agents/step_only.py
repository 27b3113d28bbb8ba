"""A strict agent that serves only ``POST /step``, the validator's path: 422 on any key or
type the validator does not send; types, clicks, then finishes."""

from wire import serve, three_steps

if __name__ == "__main__":
    serve("/step", three_steps)
