"""gcp-storage-emulator with the GCS generation semantics tensorstore relies on (`python gcs_emulator.py start ...`).

The emulator (2026.7.19) differs from GCS in two ways that break OCDBT checkpoints (orbax's default):

1. a media download (`GET .../o/NAME?alt=media`) answers without the `x-goog-generation` header that GCS
   always sends, so tensorstore's GCS driver records generation 0 for what it read;
2. the preconditions `ifGenerationMatch` / `ifGenerationNotMatch` are ignored on reads and writes (GCS
   answers 412 Precondition Failed or 304 Not Modified).

An OCDBT database in a bucket is a `manifest.ocdbt` object updated by conditional writes: write it with
`ifGenerationMatch=<the generation read>`, re-read it with `ifGenerationNotMatch=<the generation held>`.
When a save commits more than once (many arrays, or writes that land in separate batches: timing-
dependent), the re-read of the manifest gets 200 without a generation instead of 304, tensorstore holds
generation 0, and the next conditional read or write of the manifest fails with "Malformed
StorageGeneration". A single-commit save never re-reads the manifest, which is why small checkpoints
passed. Real GCS sends the header and honours the preconditions, so production is unaffected.

This launcher adds both to the emulator's object handlers (the header on every object read, the
preconditions on reads and uploads) and then runs the emulator's own command line, so that the tests
write checkpoints with orbax's defaults (OCDBT) as production does.
"""

from __future__ import annotations

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()  # a conditional write checks and writes in one step


def _current(storage, request) -> dict | None:
    """The live object's resource, or None."""
    try:
        return storage.get_file_obj(request.params["bucket_name"], request.params.get("object_id")
                                    or request.query["name"][0])
    except (NotFound, KeyError):
        return None


def _precondition_failed(request, response, current: dict | None, reading: bool) -> bool:
    """Answers 412 / 304 as GCS does when a generation precondition does not hold; True if it answered."""
    generation = int(current["generation"]) if current else 0  # 0: no live object
    match = request.query.get("ifGenerationMatch")
    if match and int(match[0]) != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return True
    not_match = request.query.get("ifGenerationNotMatch")
    if not_match and int(not_match[0]) == generation:
        response.status = HTTPStatus.NOT_MODIFIED if reading else HTTPStatus.PRECONDITION_FAILED
        return True
    return False


def _with_generation(handler):
    def read(request, response, storage, *args, **kwargs):
        current = _current(storage, request)
        if current is not None and _precondition_failed(request, response, current, reading=True):
            return None
        out = handler(request, response, storage, *args, **kwargs)
        if current is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = str(current["generation"])
            response["x-goog-metageneration"] = str(current.get("metageneration", "1"))
        return out
    return read


def _conditional_upload(handler):
    def upload(request, response, storage, *args, **kwargs):
        conditional = any(k in request.query for k in ("ifGenerationMatch", "ifGenerationNotMatch"))
        if not conditional or "name" not in request.query:
            return handler(request, response, storage, *args, **kwargs)
        with _LOCK:
            if _precondition_failed(request, response, _current(storage, request), reading=False):
                return None
            return handler(request, response, storage, *args, **kwargs)
    return upload


# Before the server module reads the handlers into its routing table.
objects.download = _with_generation(objects.download)
objects.get = _with_generation(objects.get)
objects.insert = _conditional_upload(objects.insert)

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
