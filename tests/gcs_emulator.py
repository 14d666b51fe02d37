"""A local GCS server for the tests: `gcp-storage-emulator` plus the object generations tensorstore relies on.

    python tests/gcs_emulator.py --port P --bucket B     # serves http://127.0.0.1:P until killed

The emulator stores objects with a `generation` but ignores the preconditions real GCS
honours (`ifGenerationMatch`, `ifGenerationNotMatch`) and sends no `x-goog-generation`
header with a download. Tensorstore's OCDBT format (orbax's default) commits its manifest
with exactly those conditional writes and reads, so without them a second write to a
manifest fails ("Malformed StorageGeneration"). This wraps the emulator's object handlers
to answer as GCS does: 412 when a precondition fails, 304 for a read whose generation
matches `ifGenerationNotMatch`, and the generation header on every download. The server
handles one request at a time, so a check and the write after it cannot interleave.
"""
from __future__ import annotations

import argparse
import logging
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> int:
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0  # GCS: ifGenerationMatch=0 means "the object must not exist"


def _failed_precondition(request, storage, bucket: str, name: str) -> HTTPStatus | None:
    current = _generation(storage, bucket, name)
    match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
    if match and int(match[0]) != current:
        return HTTPStatus.PRECONDITION_FAILED
    if not_match and int(not_match[0]) == current:
        return HTTPStatus.NOT_MODIFIED if request.method == "GET" else HTTPStatus.PRECONDITION_FAILED
    return None


def _conditional(handler, name_of):
    def wrapped(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], name_of(request)
        if name is not None:
            status = _failed_precondition(request, storage, bucket, name)
            if status is not None:
                response.status = status
                if status is HTTPStatus.PRECONDITION_FAILED:
                    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
        result = handler(request, response, storage, *args, **kwargs)
        if name is not None and response.status is HTTPStatus.OK and request.method == "GET":
            generation = _generation(storage, bucket, name)
            response["x-goog-generation"] = str(generation)
            response["x-goog-metageneration"] = "1"
        return result
    return wrapped


def _object_id(request):
    return request.params.get("object_id")


def _upload_name(request):
    names = request.query.get("name")
    return names[0] if names else None


def patch_handlers() -> None:
    """Wraps the emulator's object handlers; call before the server module builds its routes."""
    objects.download = _conditional(objects.download, _object_id)
    objects.get = _conditional(objects.get, _object_id)
    objects.delete = _conditional(objects.delete, _object_id)
    objects.insert = _conditional(objects.insert, _upload_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    patch_handlers()
    from gcp_storage_emulator.server import create_server  # its routes name the wrapped handlers

    create_server(args.host, args.port, in_memory=True, default_bucket=args.bucket).run()


if __name__ == "__main__":
    main()
