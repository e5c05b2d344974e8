"""MedSAM2Slicer backend: the SAM-2/MedSAM2 engine (and, built on it, the server)."""

__version__ = "0.1.0"
