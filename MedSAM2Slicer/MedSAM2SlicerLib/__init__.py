"""Qt-free core of MedSAM2Slicer: geometry, MRML writes, the session controller and the console logic."""

from .client_copy import use_own_client

use_own_client()  # before any `import medsam2_client` below this package (see client_copy)
