"""Storage and engine plans per distro, from JSON specs of fake facts (recorded command output,
processed by the real fact classes) and host data: which driver, which packages, which errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import DeployError

from dockyard_deploys import docker_engine
from dockyard_deploys.common import Distro
from dockyard_deploys.docker_storage import StoragePlan, StorageRefused, plan_storage
from dockyard_deploys.facts import BlockDevice, DockerEngine, KernelFilesystems, PathFilesystem
from dockyard_deploys.settings import EngineSettings, StorageSettings

SPECS = json.loads((Path(__file__).parent / "specs" / "storage_plans.json").read_text())


def _plan(case: dict[str, Any]) -> tuple[docker_engine.EnginePlan, StoragePlan]:
    distro = Distro.from_fact(case["distro"])
    facts = case["facts"]
    engine_plan = docker_engine.engine_plan(distro, EngineSettings.from_data(case["data"]))
    storage = plan_storage(
        distro=distro,
        kernel_fs=KernelFilesystems().process(facts["KernelFilesystems"]),
        path_fs=PathFilesystem().process(facts["PathFilesystem"]),
        engine=DockerEngine().process(facts["DockerEngine"]),
        device_state=(
            BlockDevice().process(facts["BlockDevice"]) if "BlockDevice" in facts else None
        ),
        storage=StorageSettings.from_data(case["data"]),
        expected_major=engine_plan.expected_major,
    )
    return engine_plan, storage


@pytest.mark.parametrize("case", SPECS, ids=[c["id"] for c in SPECS])
def test_storage_plan(case: dict[str, Any]) -> None:
    expect = case["expect"]
    if "deploy_error" in expect:
        with pytest.raises(DeployError) as info:
            _plan(case)
        assert expect["deploy_error"] in str(info.value)
        return
    if "error" in expect:
        with pytest.raises(StorageRefused) as refused:
            _plan(case)
        assert expect["error"] in str(refused.value)
        return
    engine, storage = _plan(case)
    assert storage.driver == expect["driver"]
    for key in ("opts", "device", "device_fs", "device_is_file", "device_size", "device_mounted"):
        if key in expect:
            assert getattr(storage, key) == expect[key], key
    if "daemon_keys" in expect:
        assert storage.daemon_keys() == expect["daemon_keys"]
    if "engine_packages" in expect:
        assert engine.packages == expect["engine_packages"]
    if "engine_major" in expect:
        assert engine.expected_major == expect["engine_major"]
    if "engine_repo_line" in expect:
        assert engine.repo_line == expect["engine_repo_line"]
    if "engine_repo_file_url" in expect:
        assert engine.repo_file_url == expect["engine_repo_file_url"]


def test_every_supported_distro_has_a_spec() -> None:
    covered = {Distro.from_fact(c["distro"]).key for c in SPECS}
    required = {
        "debian-11",
        "debian-12",
        "debian-13",
        "ubuntu-22.04",
        "ubuntu-24.04",
        "centos-7",
        "rhel-8",
        "rhel-9",
        "rocky-9",
    }
    assert required <= covered


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"docker_engine_source": "snap"}, "docker_engine_source='snap' is not valid"),
        ({"docker_engine_enabled": "no"}, "docker_engine_enabled='no' is not valid"),
        (
            {"docker_engine_source": "docker-ce", "docker_engine_version": "latest"},
            "docker_engine_version='latest' is not a version like '24.0.9'",
        ),
        (
            {"docker_engine_version": "24.0.9"},
            "docker_engine_version only applies to docker_engine_source='docker-ce'",
        ),
    ],
)
def test_engine_plan_bad_data(data: dict[str, Any], message: str) -> None:
    distro = Distro.from_fact(SPECS[0]["distro"])
    with pytest.raises(DeployError) as info:
        docker_engine.engine_plan(distro, EngineSettings.from_data(data))
    assert message in str(info.value)


def test_docker_ce_version_pin_on_debian_uses_apt_version_globs() -> None:
    distro = Distro.from_fact(SPECS[0]["distro"])
    plan = docker_engine.engine_plan(
        distro,
        EngineSettings.from_data(
            {"docker_engine_source": "docker-ce", "docker_engine_version": "27.3.1"}
        ),
    )
    assert plan.packages == ["docker-ce=5:27.3.1*", "docker-ce-cli=5:27.3.1*", "containerd.io"]
    assert plan.expected_major == 27
    assert plan.repo_line is not None and plan.repo_line.endswith("debian bookworm stable")
