"""scpermut-dist: the scPermut model, its training on Ray Train and query mapping."""
__version__ = "0.1.0"
