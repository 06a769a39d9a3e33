"""The registry's config.yml as the deploy renders it for `registry_metrics_addr` and
`registry_notifications`, from JSON specs (specs/registry_config.json): host data → the keys of
the rendered YAML, for the bundled core (with the queues' directory and the fleet CA for https
endpoints) and for a registry image (without them); every rendering is then read by the core's
own configuration parser. Invalid data is refused naming the key, the value and what is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jinja2
import pytest
import yaml

from dockyard.registry.config import NOTIFICATIONS_QUEUE_DIRECTORY, load_config
from dockyard_deploys.registry import TEMPLATES, observability
from dockyard_deploys.settings import RegistrySettings, SettingsError

SPECS = json.loads((Path(__file__).parent / "specs" / "registry_config.json").read_text())


FLEET_CA = "/etc/dockyard/registry/certs/ca.crt"


def render(reg: RegistrySettings, queue: Optional[str], fleet_ca: Optional[str]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined
    )
    return env.get_template("registry-config.yml.j2").render(
        data_dir="/srv/registry",
        listen=f"0.0.0.0:{reg.port}",
        certs_dir="/etc/dockyard/registry/certs",
        delete_enabled=reg.delete_enabled,
        clientcas=reg.client_certs,
        htpasswd=None,
        realm=reg.realm,
        log_level=reg.log_level,
        **observability(reg, queue, fleet_ca),
    )


def lookup(doc: Any, dotted: str) -> Any:
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@pytest.mark.parametrize("case", SPECS["cases"], ids=[c["id"] for c in SPECS["cases"]])
def test_registry_config_spec(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(SettingsError) as caught:
            RegistrySettings.from_data(case["data"])
        assert case["error"] in str(caught.value)
        return
    reg = RegistrySettings.from_data(case["data"])
    container = case.get("container_config", {})
    in_container = {
        k: v for k, v in case["config"].items() if not any(k.startswith(c) for c in container)
    }
    for queue, fleet_ca, expected in (
        (NOTIFICATIONS_QUEUE_DIRECTORY, FLEET_CA, case["config"]),
        (None, None, {**in_container, **container}),
    ):
        text = render(reg, queue, fleet_ca)
        doc = yaml.safe_load(text)
        for key, value in expected.items():
            assert lookup(doc, key) == value, (key, text)
        # the core reads what the deploy wrote: the same endpoints, the debug listener
        warnings: list[str] = []
        config = load_config(text=text, environ={}, warn=warnings.append)
        assert warnings == []
        assert config.debug_addr == reg.metrics_addr and config.prometheus_enabled
        assert [e.name for e in config.notifications.endpoints] == [
            e["name"] for e in reg.notifications
        ]
        if queue:
            assert config.notifications.queue_directory == queue
        assert config.notifications.cafile == lookup(doc, "notifications.dockyard.cafile")
