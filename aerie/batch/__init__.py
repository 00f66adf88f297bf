"""Batched verification across sessions: several sessions' trees in one target forward.

`cache` holds every session's KV in one preallocated tensor (a row per session), `inputs`
builds the padded ids, positions, masks and write slots of one batched forward, `verify`
runs the target over them and accepts per session, `draft` runs the draft head for every
session at once, and `engine` ties them into continuous batching.
"""
