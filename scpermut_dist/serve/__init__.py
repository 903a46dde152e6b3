"""Serving references over HTTP: `scpermut serve` (Ray Serve, in `app`) and its client (`client`).

Only `app` imports Ray; the catalogue of models, authentication and the wire format are plain Python,
so the client and `scpermut map --server` work without Ray installed.
"""
