"""Qt-free core of MedSAM2Slicer: geometry, MRML writes, the session controller and the console logic."""
