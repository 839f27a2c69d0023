"""Where records go: the datapoint log and the review webhook sink."""
