"""``GET /files/{token}``: the embedded mode's signed download links (S3's presigned URLs there).

No API key: the token is the credential, for one object until it expires (see
``services.api.signing``). With S3 storage there is no signer and every link is a 404.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from services.api.deps import StateDep
from services.api.errors import Forbidden, NotFound
from services.api.schemas import ErrorBody
from services.api.signing import FILES_PATH, LinkExpired, LinkInvalid
from services.api.storage import LocalObjectStore
from services.common.keys import BucketRole

__all__ = ["router"]

router = APIRouter(prefix=FILES_PATH, tags=["files"])


@router.get(
    "/{token}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the object"},
        403: {"model": ErrorBody, "description": "an altered or expired link"},
        404: {"model": ErrorBody, "description": "no such object, or no signed links here"},
    },
)
def download(token: str, state: StateDep) -> FileResponse:
    """The object the link names, streamed from the local storage."""
    # 1. the link: genuine and not expired
    if state.link_signer is None:
        raise NotFound("this server hands out S3 presigned URLs, not /files links")
    try:
        link = state.link_signer.verify(token)
    except (LinkInvalid, LinkExpired) as err:
        raise Forbidden(str(err)) from None

    # 2. the object, from the bucket of the link's role
    store = state.buckets.get(BucketRole(link.role))
    if not isinstance(store, LocalObjectStore):
        raise NotFound("no local storage for this link")
    path = store.local_path(link.key)
    if not path.is_file():
        raise NotFound("the object of this link no longer exists")
    info = store.stat(link.key)
    return FileResponse(path, media_type=info.content_type, filename=link.filename)
