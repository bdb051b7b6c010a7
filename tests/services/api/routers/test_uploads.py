"""``/v1/uploads`` against real Redis and S3: multipart and presigned uploads, validated before use."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import httpx
import httpx2
import pytest
from fastapi.testclient import TestClient

from services.common.jobstore import JobStore
from tests.support.api_testing import ACME, BASE_URL, GLOBEX, bucket
from tests.support.s3_server import S3ServerInfo
from tests.support.upload_files import (
    png_bytes,
    pt2_bytes,
    safetensors_bytes,
    tar_bytes,
    zip_bytes,
)

PNG = png_bytes()


def upload(
    api: TestClient, kind: str, filename: str, data: bytes, headers: dict[str, str] | None = None
) -> httpx2.Response:
    return api.post(
        "/v1/uploads",
        params={"kind": kind},
        files={"file": (filename, data, "application/octet-stream")},
        headers=ACME if headers is None else headers,
    )


def error_of(response: httpx2.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


# ---- accepted -----------------------------------------------------------------------------------


def test_a_safetensors_model_is_validated_stored_and_recorded(
    api: TestClient, s3_info: S3ServerInfo
):
    data = safetensors_bytes(metadata={"arch": "resnet18"})

    response = upload(api, "model", "weights.safetensors", data)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "ready" and body["format"] == "safetensors"
    assert body["size"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["detail"]["tensors"] == 2 and body["detail"]["parameters"] == 4 * 27 + 10
    assert body["detail"]["metadata"] == {"arch": "resnet18"}
    assert response.headers["Location"] == f"{BASE_URL}/v1/uploads/{body['id']}"
    stored = bucket(s3_info, "genq-uploads").get_bytes(
        f"uploads/acme/{body['id']}/model.safetensors"
    )
    assert stored == data
    assert api.get(f"/v1/uploads/{body['id']}", headers=ACME).json() == body


def test_a_job_can_use_an_accepted_upload(api: TestClient, store: JobStore):
    upload_id = upload(api, "model", "m.pt2", pt2_bytes()).json()["id"]

    response = api.post(
        "/v1/jobs",
        json={"kind": "genq", "model": {"source": "upload", "upload_id": upload_id}},
        headers=ACME,
    )

    assert response.status_code == 202, response.text
    job = store.get(response.json()["id"])
    assert job is not None
    assert job.config["model"]["upload_id"] == upload_id


@pytest.mark.parametrize(
    ("kind", "filename", "data", "detail"),
    [
        ("model", "exported.pt2", pt2_bytes(), {"format": "pt2", "models": ["model"]}),
        (
            "calibration",
            "calib.zip",
            zip_bytes({"a.png": PNG, "b.png": PNG, "__MACOSX/._a.png": b"junk"}),
            {"images": 2, "skipped": 1},
        ),
        (
            "kshot",
            "kshot.tar.gz",
            tar_bytes({"cat/1.png": PNG, "cat/2.png": PNG, "dog/1.png": PNG}, gzip=True),
            {"images": 3, "classes": {"cat": 2, "dog": 1}},
        ),
        (
            "eval",
            "eval.tar",
            tar_bytes({"cat/1.png": PNG, "dog/1.png": PNG}),
            {"classes": {"cat": 1, "dog": 1}},
        ),
    ],
)
def test_valid_uploads_of_each_kind_are_ready(
    api: TestClient, kind: str, filename: str, data: bytes, detail: dict[str, Any]
):
    response = upload(api, kind, filename, data)

    assert response.status_code == 201, response.text
    assert response.json()["status"] == "ready"
    assert detail.items() <= response.json()["detail"].items()


# ---- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "filename", "data", "message"),
    [
        (
            "calibration",
            "c.zip",
            zip_bytes({"ok.png": PNG, "imgs/broken.png": PNG[: len(PNG) // 2]}),
            "member 'imgs/broken.png' is not a decodable image",
        ),
        (
            "calibration",
            "c.zip",
            zip_bytes({"ok.png": PNG, "../../etc/evil.png": PNG}),
            "member '../../etc/evil.png' has an unsafe path",
        ),
        (
            "calibration",
            "c.tar",
            tar_bytes({"/abs/evil.png": PNG}),
            "member '/abs/evil.png' has an unsafe path",
        ),
        (
            "calibration",
            "c.zip",
            zip_bytes({"notes.txt": b"hi"}),
            "member 'notes.txt' is not an image",
        ),
        (
            "kshot",
            "k.zip",
            zip_bytes({"cat/1.png": PNG, "loose.png": PNG}),
            "member 'loose.png' is not inside a class folder",
        ),
        (
            "model",
            "m.safetensors",
            pickle.dumps({"weight": [1.0, 2.0]}),
            "not a safetensors file: it looks like a Python pickle",
        ),
        (
            "model",
            "m.pt2",
            zip_bytes({"archive/data.pkl": pickle.dumps({}), "archive/version": b"3"}),
            "member 'archive/data.pkl': this is a torch.save checkpoint (a pickle)",
        ),
        (
            "model",
            "m.safetensors",
            safetensors_bytes()[:-4],
            "the file is truncated",
        ),
    ],
)
def test_invalid_content_is_a_422_naming_the_member_and_keeps_nothing(
    api: TestClient, s3_info: S3ServerInfo, kind: str, filename: str, data: bytes, message: str
):
    stored_before = bucket(s3_info, "genq-uploads").list("uploads/acme/")

    response = upload(api, kind, filename, data)

    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_upload"
    assert message in error["message"], error["message"]
    assert bucket(s3_info, "genq-uploads").list("uploads/acme/") == stored_before


def test_pickled_checkpoints_are_refused_by_their_name_before_reading_them(api: TestClient):
    response = upload(api, "model", "resnet.pt", pickle.dumps({"w": 1}))

    assert response.status_code == 422
    error = error_of(response)
    assert error["fields"] == [
        {"field": "filename", "message": error["message"].removeprefix("filename: ")}
    ]
    assert "pickled checkpoints (.pt, .pth, .bin, .ckpt) are refused" in error["message"]


def test_an_upload_over_the_kinds_limit_is_a_413_naming_the_limit(
    make_client: Callable[..., TestClient],
):
    api = make_client(max_upload_bytes_model=1000)

    response = upload(api, "model", "big.safetensors", bytes(5000))

    assert response.status_code == 413
    assert error_of(response)["message"] == (
        "the upload is larger than this service's limit of 1000 bytes (GENQ_MAX_UPLOAD_BYTES_MODEL)"
    )


def test_malformed_requests(api: TestClient):
    not_multipart = api.post("/v1/uploads", params={"kind": "model"}, content=b"raw", headers=ACME)
    bad_kind = upload(api, "weights", "m.safetensors", safetensors_bytes())
    form_field = api.post(
        "/v1/uploads", params={"kind": "model"}, files={"note": (None, "x")}, headers=ACME
    )

    assert not_multipart.status_code == 415
    assert bad_kind.status_code == 422 and error_of(bad_kind)["fields"][0]["field"] == "kind"
    assert form_field.status_code == 422
    assert error_of(form_field)["message"].startswith("file: form field 'note' is not a file")


# ---- presigned uploads --------------------------------------------------------------------------


def presign(api: TestClient, kind: str, filename: str, size: int) -> httpx2.Response:
    body = {"kind": kind, "filename": filename, "size": size}
    return api.post("/v1/uploads/presign", json=body, headers=ACME)


def test_presigned_put_then_complete_validates_and_stores_the_upload(
    api: TestClient, s3_info: S3ServerInfo
):
    data = zip_bytes({"cat/1.png": PNG, "dog/1.png": PNG})
    presigned = presign(api, "kshot", "shots.zip", len(data))
    assert presigned.status_code == 201, presigned.text
    upload_id = presigned.json()["id"]
    complete_url = presigned.json()["complete_url"]
    assert complete_url == f"{BASE_URL}/v1/uploads/{upload_id}/complete"

    too_early = api.post(complete_url, headers=ACME)
    pending = api.get(f"/v1/uploads/{upload_id}", headers=ACME).json()
    put = httpx.put(presigned.json()["url"], content=data)
    completed = api.post(complete_url, headers=ACME)
    again = api.post(complete_url, headers=ACME)

    assert too_early.status_code == 409 and error_of(too_early)["code"] == "not_uploaded"
    assert pending["status"] == "pending" and pending["size"] is None
    assert put.status_code == 200, put.text
    assert completed.status_code == 200, completed.text
    assert completed.json()["status"] == "ready"
    assert completed.json()["detail"]["classes"] == {"cat": 1, "dog": 1}
    assert completed.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert again.json() == completed.json()
    uploads = bucket(s3_info, "genq-uploads")
    assert uploads.list(f"uploads/acme/{upload_id}/") == [f"uploads/acme/{upload_id}/images.zip"]


def test_a_presigned_upload_that_fails_validation_becomes_invalid(api: TestClient):
    data = zip_bytes({"cat/1.png": b"not an image"})
    presigned = presign(api, "kshot", "shots.zip", len(data)).json()
    httpx.put(presigned["url"], content=data)

    completed = api.post(presigned["complete_url"], headers=ACME)
    record = api.get(f"/v1/uploads/{presigned['id']}", headers=ACME).json()
    again = api.post(presigned["complete_url"], headers=ACME)
    job = api.post(
        "/v1/jobs",
        json={
            "kind": "genq",
            "model": {"source": "timm", "name": "resnet18"},
            "data_scarce": {"kshot_upload_id": presigned["id"]},
        },
        headers=ACME,
    )

    assert completed.status_code == again.status_code == 422
    assert "member 'cat/1.png' is not a decodable image" in error_of(completed)["message"]
    assert record["status"] == "invalid"
    assert record["error"]["message"] == error_of(completed)["message"]
    assert job.status_code == 422 and "is invalid, not ready" in error_of(job)["message"]


def test_presign_checks_the_name_and_the_announced_size(make_client: Callable[..., TestClient]):
    api = make_client(max_upload_bytes_eval=100)

    too_big = presign(api, "eval", "e.zip", 101)
    bad_name = presign(api, "eval", "e.rar", 10)

    assert (
        too_big.status_code == 413 and "GENQ_MAX_UPLOAD_BYTES_EVAL" in error_of(too_big)["message"]
    )
    assert bad_name.status_code == 422 and error_of(bad_name)["fields"][0]["field"] == "filename"


def test_uploads_are_invisible_to_other_tenants(api: TestClient):
    upload_id = upload(api, "model", "m.safetensors", safetensors_bytes()).json()["id"]
    presigned_id = presign(api, "model", "m.safetensors", 10).json()["id"]

    assert api.get(f"/v1/uploads/{upload_id}", headers=GLOBEX).status_code == 404
    assert api.post(f"/v1/uploads/{presigned_id}/complete", headers=GLOBEX).status_code == 404
    assert api.get("/v1/uploads/upl_nope", headers=ACME).status_code == 404
    assert upload(api, "model", "m.safetensors", b"", headers={}).status_code == 401
