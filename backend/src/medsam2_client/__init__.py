"""A client for the MedSAM2 backend server: standard library and numpy only, so it runs inside 3D Slicer."""

from .client import MedSAM2Client, RemotePropagation, RemoteSession, SliceMask
from .errors import (BackendUnavailable, BadRequest, Busy, ConnectionRefused, MedSAM2Error, NotFound,
                     ServerError, SessionExpired, Timeout, TooLarge, Unauthorized, VersionMismatch)
from .protocol import PROTOCOL_VERSION

__all__ = ["BackendUnavailable", "BadRequest", "Busy", "ConnectionRefused", "MedSAM2Client", "MedSAM2Error",
           "NotFound", "PROTOCOL_VERSION", "RemotePropagation", "RemoteSession", "ServerError", "SessionExpired",
           "SliceMask", "Timeout", "TooLarge", "Unauthorized", "VersionMismatch"]
