"""Operator commands built on the proxy's parts: up, the local model, collect, classify."""
