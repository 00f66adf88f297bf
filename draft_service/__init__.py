"""The draft service: the EAGLE head, the draft trees, and the rounds against a verifier."""
