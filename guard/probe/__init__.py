"""The introspection probe: its template and parser, the prober that runs it, and the policy that acts on it."""
