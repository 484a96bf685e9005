"""Triton's LogSettings RPC (server/log_settings.py): the stock tritonclient reads and
changes the server's log level while it runs; what innfer's one threshold cannot do, and
changes from anyone on a network port without a token, are refused with the reason."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from server.config import ServerConfig
from server.errors import FailedPrecondition
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import grpc_service_pb2_grpc as rpc
from server.service import InferenceService

INNFER = logging.getLogger("innfer")


def test_the_log_level_is_read_and_changed_through_tritonclient(client):
    INNFER.setLevel(logging.INFO)
    got = client.get_log_settings(as_json=True)["settings"]
    assert {k: next(iter(v.values())) for k, v in got.items() if k != "log_file"} == {
        "log_info": True, "log_warning": True, "log_error": True,
        "log_verbose_level": 0, "log_format": "default",
    }  # fmt: skip
    got = client.update_log_settings({"log_verbose_level": 1}, as_json=True)["settings"]
    assert INNFER.level == logging.DEBUG and got["log_verbose_level"]["uint32_param"] == 1
    client.update_log_settings({"log_verbose_level": 0, "log_info": False})
    assert INNFER.level == logging.WARNING
    assert logging.getLogger().level == logging.WARNING  # libraries follow, INFO at least
    client.update_log_settings({"log_warning": False, "log_error": False})
    assert INNFER.level == logging.CRITICAL
    client.update_log_settings({"log_info": True, "log_warning": True, "log_error": True})
    assert INNFER.level == logging.INFO


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"log_file": "/var/log/innfer.log"}, "log_file is not supported: innfer logs JSON"),
        ({"log_format": "ISO8601"}, "log_format 'ISO8601' is not supported"),
        ({"log_info": True, "log_warning": False}, "log_info needs log_warning and log_error"),
        ({"log_verbose_level": 2, "log_error": False}, "log_error cannot be off beside it"),
        ({"log_colour": True}, "unknown log setting 'log_colour'"),
    ],
)
def test_what_one_threshold_cannot_do_is_refused(client, settings, message):
    INNFER.setLevel(logging.INFO)
    with pytest.raises(InferenceServerException, match=message) as e:
        client.update_log_settings(settings)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert INNFER.level == logging.INFO  # nothing half-applied


def test_a_setting_of_the_wrong_type_is_refused(server):
    with grpc.insecure_channel(server.address) as channel:
        req = pb.LogSettingsRequest()
        req.settings["log_info"].uint32_param = 1
        with pytest.raises(grpc.RpcError) as e:
            rpc.GRPCInferenceServiceStub(channel).LogSettings(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "log setting 'log_info' takes a bool, got a uint32" in e.value.details()


def test_changes_need_a_token_where_other_hosts_reach_the_port(tmp_path):
    def refused(**kw) -> str | None:
        cfg = ServerConfig.from_dict({"repository": str(tmp_path), **kw})
        return InferenceService._log_settings_refused(SimpleNamespace(plane=SimpleNamespace(
            config=cfg)))  # fmt: skip

    assert refused() is None  # loopback: only this machine
    assert "read-only on 0.0.0.0 without auth" in refused(host="0.0.0.0")
    assert refused(host="0.0.0.0", auth={"bearer_token": "t" * 32}) is None
    from server import log_settings

    req = pb.LogSettingsRequest()
    req.settings["log_verbose_level"].uint32_param = 1
    with pytest.raises(FailedPrecondition, match="read-only"):
        log_settings.update(req.settings, refused(host="0.0.0.0"))


def test_verbose_off_brings_back_the_threshold_it_replaced(client):
    # Triton keeps the verbose level apart from the info/warning switches: errors only,
    # verbose 1, verbose 0 ended at INFO here, two switched-off levels back on unsaid
    # (review helper-261).
    INNFER.setLevel(logging.INFO)
    client.update_log_settings({"log_info": False, "log_warning": False})
    client.update_log_settings({"log_verbose_level": 1})
    assert INNFER.level == logging.DEBUG
    client.update_log_settings({"log_verbose_level": 0})
    assert INNFER.level == logging.ERROR
    client.update_log_settings({"log_verbose_level": 1})  # switches sent with it decide
    got = client.get_log_settings(as_json=True)["settings"]  # read as they were before
    assert [got[k]["bool_param"] for k in ("log_info", "log_warning")] == [False, False]
    client.update_log_settings({"log_verbose_level": 0, "log_warning": True})
    assert INNFER.level == logging.WARNING
    # a switch sent while verbose is kept for verbose 0, as Triton keeps it
    client.update_log_settings({"log_verbose_level": 1, "log_info": True})
    client.update_log_settings({"log_verbose_level": 0})
    assert INNFER.level == logging.INFO


def test_every_change_is_on_record_and_the_verbose_level_reads_back(client, caplog):
    # ERROR <-> CRITICAL went unsaid (a warning on either side of the change is dropped),
    # and log_verbose_level 2 read back as 1 (review 205).
    INNFER.setLevel(logging.ERROR)
    off = {"log_info": False, "log_warning": False, "log_error": False}
    caplog.handler.setLevel(logging.DEBUG)  # the loggers' levels stay the server's own
    client.update_log_settings(off)
    client.update_log_settings({"log_error": True})
    changes = [r.getMessage() for r in caplog.records if r.name == "innfer.log_settings"]
    assert changes == ["log level ERROR -> CRITICAL (LogSettings)",
                       "log level CRITICAL -> ERROR (LogSettings)"]  # fmt: skip
    got = client.update_log_settings({"log_verbose_level": 2}, as_json=True)["settings"]
    assert got["log_verbose_level"]["uint32_param"] == 2
