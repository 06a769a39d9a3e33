"""Registry errors: typed per layer and translated to the OCI error code and HTTP status in one
table (`ERROR_STATUS`), so no handler picks a status by itself."""

from __future__ import annotations

from typing import Any, Optional


class DriverError(Exception):
    """Base of storage-driver errors."""


class PathNotFound(DriverError):
    """The driver has nothing at this path."""


class InvalidPath(DriverError):
    """A path outside the storage root or with forbidden components."""


class PathLocked(DriverError):
    """Another writer (in any process sharing the storage) holds this file's lock."""


class RegistryError(Exception):
    """An error with an OCI error code; the HTTP status comes from ERROR_STATUS."""

    code = "UNKNOWN"
    message = "unknown error"

    def __init__(self, detail: Any = None, message: Optional[str] = None) -> None:
        super().__init__(message or self.message)
        self.detail = detail
        if message:
            self.message = message

    def body(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    message = "blob unknown to registry"


class BlobUploadInvalid(RegistryError):
    code = "BLOB_UPLOAD_INVALID"
    message = "blob upload invalid"


class BlobUploadUnknown(RegistryError):
    code = "BLOB_UPLOAD_UNKNOWN"
    message = "blob upload unknown to registry"


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    message = "provided digest did not match uploaded content"


class ManifestBlobUnknown(RegistryError):
    code = "MANIFEST_BLOB_UNKNOWN"
    message = "manifest references a blob unknown"


class ManifestInvalid(RegistryError):
    code = "MANIFEST_INVALID"
    message = "manifest invalid"


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    message = "manifest unknown"


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    message = "invalid repository name"


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    message = "repository name not known to registry"


class SizeInvalid(RegistryError):
    code = "SIZE_INVALID"
    message = "provided length did not match content length"


class TagInvalid(RegistryError):
    """A tag that does not match the spec's tag pattern (the spec has no TAG_INVALID code)."""

    code = "MANIFEST_INVALID"
    message = "invalid tag"


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    message = "authentication required"


class Denied(RegistryError):
    code = "DENIED"
    message = "requested access to the resource is denied"


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    message = "The operation is unsupported."


class RangeInvalid(RegistryError):
    """A chunk that does not start where the upload ends (out of order or repeated)."""

    code = "BLOB_UPLOAD_INVALID"
    message = "invalid content range"


class RangeNotSatisfiable(RegistryError):
    """A blob Range outside the blob."""

    code = "SIZE_INVALID"
    message = "requested range not satisfiable"


class PaginationInvalid(RegistryError):
    """An `n` that is not a number (UNSUPPORTED: "an invalid set of parameters")."""

    code = "UNSUPPORTED"
    message = "invalid number of results requested"


class TooLarge(RegistryError):
    code = "SIZE_INVALID"
    message = "content exceeds the size limit"


class NotFound(RegistryError):
    """A path that is no endpoint of the API (the spec has no NOT_FOUND code)."""

    code = "UNSUPPORTED"
    message = "no such endpoint"


class RequestInvalid(RegistryError):
    """A request aiohttp refused before any handler saw it (request line, headers, body)."""

    code = "UNSUPPORTED"
    message = "malformed HTTP request"


class TooManyRequests(RegistryError):
    """Too much work asked at once (detail["retry_after"]: seconds, for Retry-After)."""

    code = "TOOMANYREQUESTS"
    message = "too many requests"


class Unavailable(RegistryError):
    code = "UNAVAILABLE"
    message = "storage unavailable"


class InternalError(RegistryError):
    """A failure of the registry itself (5xx: the spec lists client errors only)."""

    code = "UNKNOWN"
    message = "internal server error"


# The one table from error type to HTTP status (OCI distribution spec, section "Error Codes").
ERROR_STATUS: dict[type[RegistryError], int] = {
    BlobUnknown: 404,
    BlobUploadInvalid: 400,
    BlobUploadUnknown: 404,
    DigestInvalid: 400,
    ManifestBlobUnknown: 400,
    ManifestInvalid: 400,
    ManifestUnknown: 404,
    NameInvalid: 400,
    NameUnknown: 404,
    SizeInvalid: 400,
    TagInvalid: 400,
    Unauthorized: 401,
    Denied: 403,
    Unsupported: 405,
    RangeInvalid: 416,
    RangeNotSatisfiable: 416,
    PaginationInvalid: 400,
    TooLarge: 413,
    NotFound: 404,
    RequestInvalid: 400,
    TooManyRequests: 429,
    Unavailable: 503,
    InternalError: 500,
}

# aiohttp's own errors (from its router, its HTTP parser, request.read(), an exception no handler
# caught), by HTTP status, as the errors above; any other status below 500 is RequestInvalid and
# any other from 500 up is InternalError.
HTTP_ERRORS: dict[int, type[RegistryError]] = {
    400: RequestInvalid,
    404: NotFound,
    405: Unsupported,
    413: TooLarge,
    429: TooManyRequests,
    503: Unavailable,
}


def status_for(error: RegistryError) -> int:
    return ERROR_STATUS.get(type(error), 500)


def error_for_status(status: int, reason: Optional[str] = None) -> RegistryError:
    """The registry error standing for an error answer aiohttp made itself (see HTTP_ERRORS);
    `reason`, aiohttp's text, is kept (shortened) as the detail."""
    kind = HTTP_ERRORS.get(status, RequestInvalid if status < 500 else InternalError)
    return kind({"reason": reason[:200]} if reason else None)
