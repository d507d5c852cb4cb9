"""The local GCS of the tests (`python tests/gcs_emulator.py start --port N ...`, conftest's `gcs` fixture):
gcp-storage-emulator, plus the `x-goog-generation` header on object downloads. tensorstore's gcs kvstore reads an
object's generation from that header, and OCDBT (orbax's checkpoint format) reads its manifest back before updating
it; without the header the read fails with "Malformed StorageGeneration" whenever a checkpoint's arrays commit in
more than one batch (it depends on timing, so a run fails now and then)."""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before the server module builds its routes from it

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main
  sys.exit(main())
