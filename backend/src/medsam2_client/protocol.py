"""The HTTP protocol shared by the server and the client: version, routes, error codes, headers, default limits.

Both sides import these names so a route or code can never be spelled two ways. The protocol version changes
when a request or response changes incompatibly; the client refuses a server with another major version.
"""

import ipaddress

PROTOCOL_VERSION = 2  # 2: one JSON open, volumes uploaded by fingerprint, acknowledged propagation streams
API_PREFIX = "/v1"

# Routes (the session id and object id are path parameters).
HEALTH = API_PREFIX + "/health"
CAPABILITIES = API_PREFIX + "/capabilities"
VOLUME = API_PREFIX + "/volumes/{fingerprint}"  # PUT a volume the server said it lacks
SESSIONS = API_PREFIX + "/sessions"
SESSION = SESSIONS + "/{session_id}"
PROMPTS = SESSION + "/prompts"
PROPAGATE = SESSION + "/propagate"
CANCEL = SESSION + "/cancel"
PREPROCESSING = SESSION + "/preprocessing"
OBJECT = SESSION + "/objects/{obj_id}"
ACKNOWLEDGE = PROPAGATE + "/ack"  # the client has read N slices of the running propagation

# Stable error codes and the HTTP status each is sent with.
BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
SESSION_EXPIRED = "session_expired"
TOO_LARGE = "too_large"
BUSY = "busy"
INTERNAL = "internal"
HTTP_STATUS = {BAD_REQUEST: 400, UNAUTHORIZED: 401, NOT_FOUND: 404, SESSION_EXPIRED: 410, TOO_LARGE: 413,
               BUSY: 409, INTERNAL: 500}

# Headers.
AUTHORIZATION = "Authorization"  # "Bearer <token>"
PROTOCOL_HEADER = "X-MedSAM2-Protocol"  # the client's protocol version, on every request

# Default limits of a server (the server reports its own in /capabilities).
DEFAULT_PORT = 8765
DEFAULT_MAX_SESSIONS = 8
DEFAULT_MEMORY_BUDGET_BYTES = 8 << 30
DEFAULT_IDLE_TIMEOUT_S = 30 * 60
DEFAULT_MAX_UPLOAD_BYTES = 2 << 30
MAX_JSON_BYTES = 4 << 20  # any JSON request; a worst-case 4096^2 mask prompt is ~2.8 MiB of base64
DEFAULT_EVICTION_GRACE_S = 60.0  # a session used this recently is never evicted for another
MAX_OBJECTS_PER_SESSION = 64
DEFAULT_MAX_CONNECTIONS = 64
HEADER_TIMEOUT_S = 10.0  # a connection must have sent its request's headers by then
DEFAULT_BODY_IDLE_S = 30.0  # a request body that stops arriving for this long is refused
DEFAULT_STALL_TIMEOUT_S = 60.0  # a propagation whose client reads nothing for this long is cancelled
PROPAGATION_WINDOW = 32  # slices the server computes beyond what the client has acknowledged
CLIENT_BUSY_RETRY_S = 90.0  # how long the client retries a busy server (honouring Retry-After) before raising

# Names shared by the engine, the server, the client and the Slicer panel: defined once, here (the one package
# Slicer always has), so a list shown before connecting is the one the backend accepts. The panel refreshes them
# from a server's /capabilities after connecting.
CT_PRESETS = {  # name -> (level, width) in Hounsfield units
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (60.0, 350.0),
}
PRECISIONS = ("fp32", "bf16")
SLICE_STAGES = ("prompt", "propagate", "postprocess", "cleared")  # what a streamed slice result is
VOLUME_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
DEFAULT_CACHE_BUDGET_BYTES = 1 << 30  # backbone features kept per session

PROMPT_TYPES = ("points", "box", "mask")
DIRECTIONS = ("both", "forward", "backward")
POSTPROCESS_STEPS = ("largest_component", "fill_holes")


def is_loopback(host: str) -> bool:
    """Whether `host` names this computer only: the server needs no token there, the client sends raw voxels."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
