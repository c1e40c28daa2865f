"""The shipped config files: gateway.yaml is the packaged default profile, and every profile validates."""
from pathlib import Path

import pytest

from gateway.config import load_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {"GATEWAY_ADMIN_TOKEN": "x" * 32, "UPSTREAM_URL": "http://127.0.0.1:9", "GATEWAY_KEY_PEPPER": "pepper",
       "GATEWAY_DATABASE_URL": "postgresql+asyncpg://gw@127.0.0.1/gw", "GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0"}


def test_gateway_yaml_is_the_packaged_default_profile():
    assert (ROOT / "gateway.yaml").read_text() == (ROOT / "config" / "profiles" / "default.yaml").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "profiles").glob("*.yaml")) + [ROOT / "gateway.yaml"],
                         ids=lambda p: p.name)
def test_profile_validates(path):
    cfg = load_config(path, env=ENV)
    assert [p.name for p in cfg.plugins][:2] == ["key_auth", "rate_limit"]
    assert cfg.admin.enabled and cfg.admin.host == "127.0.0.1"
