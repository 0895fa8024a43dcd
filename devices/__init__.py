"""Device kinds, the canonical event model and sans-IO codecs.

This is the bottom layer: it imports only pydantic and the standard library.
"""
