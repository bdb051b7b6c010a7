"""docker-compose.yml, checked offline: Debian's docker-compose (1.29) resolves and validates it
without an engine (`config`), and the settings it gives each container are ones the services accept
(the API and the dispatcher would start)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.api.settings import ApiSettings, hash_api_key
from services.workers.dispatcher import DispatcherSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "MINIO_ROOT_USER": "genq-admin",
    "MINIO_ROOT_PASSWORD": "a-long-minio-password",
    "GENQ_API_KEYS": f"{hash_api_key('team-key')}=team",
}


def project(tmp_path: Path, **overrides: str) -> Path:
    """A copy of the compose project with a .env made from deploy/env.example plus ``overrides``."""
    shutil.copy(REPO_ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / "deploy").symlink_to(REPO_ROOT / "deploy")
    lines = []
    values = {**SECRETS, **overrides}
    for line in (REPO_ROOT / "deploy" / "env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={values.pop(name)}" if name in values else line)
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    return tmp_path


def compose(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: scripts/install.sh installs it (apt)"
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("GENQ_")}
    return subprocess.run(
        [binary, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )


def resolved(tmp_path: Path) -> dict[str, Any]:
    result = compose(project(tmp_path), "config")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_the_compose_file_validates_with_every_service(tmp_path: Path):
    services = resolved(tmp_path)["services"]

    assert set(services) == {"redis", "minio", "minio-init", "ray-head", "worker", "api"}
    assert "--appendonly" in services["redis"]["command"]
    for name in ("redis", "minio", "ray-head", "api"):
        assert "healthcheck" in services[name], name
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["minio"]["condition"] == "service_healthy"
    [gpu] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "ports" not in services["worker"]  # scalable: --scale worker=N
    assert ":latest" not in services["minio"]["image"] and "RELEASE." in services["minio"]["image"]


@pytest.mark.parametrize("missing", ["MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "GENQ_API_KEYS"])
def test_a_missing_secret_stops_compose_and_names_it(tmp_path: Path, missing: str):
    result = compose(project(tmp_path, **{missing: ""}), "config")

    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_the_containers_settings_are_ones_the_services_accept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    services = resolved(tmp_path)["services"]

    def environment(service: str) -> None:
        for name in list(os.environ):
            if name.startswith("GENQ_"):
                monkeypatch.delenv(name)
        for name, value in services[service]["environment"].items():
            monkeypatch.setenv(name, "" if value is None else str(value))

    environment("api")
    api = ApiSettings()
    api.check()  # the API would start: keys, Redis and S3 are all set
    assert api.mode == "distributed" and api.key_digests() == {
        hash_api_key("team-key").removeprefix("sha256:"): "team"
    }
    assert api.s3_public_endpoint == "localhost:9000" and api.public_base_url is None

    environment("ray-head")
    dispatcher = DispatcherSettings()
    dispatcher.check()
    assert (dispatcher.device, dispatcher.ray_address, dispatcher.actor_num_gpus) == (
        "cuda",
        "auto",
        1.0,
    )
    assert dispatcher.model_cache_dir == Path("/cache/genq")


def test_the_bucket_init_script_makes_every_bucket_and_expires_only_data():
    script = (REPO_ROOT / "deploy" / "minio-init.sh").read_text()

    for bucket in ("DATA_BUCKET", "RESULTS_BUCKET", "UPLOADS_BUCKET"):
        assert f'"${bucket}"' in script
    assert 'ilm rule add --expire-days "$DATA_EXPIRE_DAYS" "local/$DATA_BUCKET"' in script
    assert script.count("ilm rule add") == 1
