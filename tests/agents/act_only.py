"""A strict agent that serves only ``POST /act`` (many current miners do): 422 on any key
or type the validator does not send; types, clicks, then finishes."""

from wire import serve, three_steps

if __name__ == "__main__":
    serve("/act", three_steps)
