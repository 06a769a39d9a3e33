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
    code = "TAG_INVALID"
    message = "manifest tag did not match URI"


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
    code = "PAGINATION_NUMBER_INVALID"
    message = "invalid number of results requested"


class TooLarge(RegistryError):
    code = "SIZE_INVALID"
    message = "content exceeds the size limit"


class NotFound(RegistryError):
    code = "NOT_FOUND"
    message = "not found"


class Unavailable(RegistryError):
    code = "UNAVAILABLE"
    message = "storage unavailable"


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
    Unavailable: 503,
}


def status_for(error: RegistryError) -> int:
    return ERROR_STATUS.get(type(error), 500)
