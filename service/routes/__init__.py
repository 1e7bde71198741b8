"""HTTP routes: each module decodes the request, calls the runtime, encodes the answer."""
