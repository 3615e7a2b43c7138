"""The deployment service without HTTP: a Repository, a Coordinator and the checks a
deployment request goes through, each refusal a rain.model.errors exception."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rain.deploy.config import DistributeConfig
from rain.deploy.coordinator import Coordinator
from rain.deploy.service import DeploymentRequest, DeploymentService
from rain.distribute.methods.base import RepoSide
from rain.model import Image, InstanceStatus, User
from rain.model.errors import AgentUnreachable, InvalidRequest, NotFound, Unauthorized
from rain.repo import Repository
from rain.schedule import ScheduleConfig

KEY = "agent-key-0123456789abcdef"


@dataclass
class World:
    repo: Repository
    service: DeploymentService
    admin: User
    alice: User
    bob: User
    image: Image  # alice's


def report(name: str, address: str = "http://198.18.0.11:8481") -> dict[str, Any]:
    return {"name": name, "address": address, "agent_key": KEY, "capacity_instances": 8,
            "cache_capacity": 10 << 30}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    repo = Repository.open(tmp_path / "data", f"sqlite:///{tmp_path / 'c.db'}")
    coordinator = Coordinator(repo, RepoSide(repo, DistributeConfig(), "127.0.0.1", 0,
                                             tmp_path / "side"), repo.catalog)
    service = DeploymentService(repo, coordinator, ScheduleConfig())
    admin, _ = repo.local_create_user("root", admin=True)
    alice, _ = repo.local_create_user("alice")
    bob, _ = repo.local_create_user("bob")
    raw = tmp_path / "d.raw"
    raw.write_bytes(os.urandom(1 << 20))
    image = repo.upload_file(alice, repo.create(alice, {"name": "d"}).id, raw)
    service.nodes.register_node(admin, report("n1"))
    try:
        yield World(repo, service, admin, alice, bob, image)
    finally:
        coordinator.close()
        repo.close()


@pytest.mark.parametrize(("fields", "error", "phrase"), [
    # Bad options are refused as the request is read (DeployOptions.from_json:
    # tests/model/test_deploy_options.py, tests/deploy/test_options_wire.py).
    ({"nodes": ["nowhere"]}, NotFound, "no such node: nowhere"),
    ({"nodes": 7}, InvalidRequest, "nodes must be a list"),
    ({"nodes": ["n1"], "all_nodes": True}, InvalidRequest, "either nodes or all"),
    ({"method": "cache"}, InvalidRequest, "not one to ask for"),
    ({"method": "carrier-pigeon"}, InvalidRequest, "unknown method"),
    ({"count": 0}, InvalidRequest, "count must be between 1 and"),
    ({"count": "many"}, InvalidRequest, "count must be a whole number"),
    ({"count": 2, "prefetch": True}, InvalidRequest, "a prefetch starts no instances"),
    ({"policy": "pack", "prefetch": True}, InvalidRequest, "leave policy out"),
])
def test_a_bad_request_is_refused_and_records_nothing(world: World, fields: dict[str, Any],
                                                      error: type[Exception],
                                                      phrase: str) -> None:
    req = DeploymentRequest(**{"image": world.image.id, "nodes": ["n1"], **fields})
    with pytest.raises(error, match=phrase):
        world.service.create(world.alice, req)
    assert world.service.records.list_deployments(world.admin)[1] == 0


def test_only_users_deploy_and_only_images_they_may_read(world: World) -> None:
    with pytest.raises(Unauthorized):
        world.service.create(None, DeploymentRequest(image=world.image.id, nodes=["n1"]))
    with pytest.raises(NotFound):  # alice's private image, as bob sees it
        world.service.create(world.bob, DeploymentRequest(image=world.image.id, nodes=["n1"]))


def test_others_deployments_and_instances_are_not_found(world: World) -> None:
    records = world.service.records
    dep = records.new_deployment(world.alice, world.image, method="http", count=1,
                                 nodes=["n1"], options={})
    records.add_instances(dep, [("i-1", "n1", world.image.id)])
    with pytest.raises(NotFound):
        world.service.cancel(world.bob, dep.id)
    with pytest.raises(NotFound):
        world.service.delete_instance(world.bob, "i-1")
    assert records.get_instance(world.alice, "i-1").status == InstanceStatus.CREATING


def test_removing_an_instance_on_a_node_that_does_not_answer(world: World) -> None:
    """The agent is down (nothing listens on the port): refused unless `forget`, which
    closes the record anyway."""
    world.service.nodes.register_node(world.admin, report("gone", "http://127.0.0.1:9"))
    records = world.service.records
    dep = records.new_deployment(world.alice, world.image, method="http", count=1,
                                 nodes=["gone"], options={})
    records.add_instances(dep, [("i-2", "gone", world.image.id)])
    with pytest.raises(AgentUnreachable):
        world.service.delete_instance(world.alice, "i-2")
    assert records.get_instance(world.alice, "i-2").status == InstanceStatus.CREATING
    done = world.service.delete_instance(world.alice, "i-2", forget=True)
    assert done.status == InstanceStatus.DELETED
