"""The proxy path: parse a request, forward it upstream, relay the answer, decide and act on the probe."""
