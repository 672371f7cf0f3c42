"""Third-party channels register through the `herald.channels` entry-point group, as the
README shows: a package installed beside Herald (here a dist-info on sys.path) is found,
validated with its own settings model, and sends."""

from __future__ import annotations

import textwrap

import pytest

from herald.channels import registry
from herald.core.errors import ChannelError
from herald.flows import engine

from .helpers import PROMO_YAML, ledger_rows

PIGEON = '''
import json
from pathlib import Path

from pydantic import SecretStr

from herald.channels.base import Channel, ChannelSettings, SendResult


class PigeonSettings(ChannelSettings):
    loft: str
    token: SecretStr


class PigeonChannel(Channel):
    type_name = "pigeon"
    kinds = frozenset({"sms"})
    Settings = PigeonSettings
    batch_size = 5

    async def send_batch(self, messages):
        loft = Path(self.context.workspace) / self.settings.loft
        with loft.open("a") as fh:
            for m in messages:
                fh.write(json.dumps({"to": m.address, "body": m.body}) + "\\n")
        return [SendResult.sent(provider_id=f"p{m.recipient}") if not m.address.endswith("9")
                else SendResult.permanent("lost", "the pigeon did not return")
                for m in messages]
'''


@pytest.fixture
def pigeon_installed(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "herald_pigeon").mkdir(parents=True)
    (site / "herald_pigeon" / "__init__.py").write_text(PIGEON)
    dist = site / "herald_pigeon-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: herald-pigeon\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [herald.channels]
        pigeon = herald_pigeon:PigeonChannel
        broken = herald_pigeon_missing:Nope
        """))
    monkeypatch.syspath_prepend(str(site))
    registry._entry_points.cache_clear()
    registry.channel_class.cache_clear()
    yield
    registry._entry_points.cache_clear()
    registry.channel_class.cache_clear()


def test_a_registered_third_party_channel_is_found_and_sends(make_workspace,
                                                             pigeon_installed) -> None:
    assert {"pigeon", "outbox", "smtp", "sms", "wechat", "webhook"} <= set(registry.installed())
    with pytest.raises(ChannelError, match=r"channel 'broken' failed to import: "
                                           r"ModuleNotFoundError"):
        registry.channel_class("broken")
    with pytest.raises(ChannelError, match=r"unknown channel type 'pigon' \(did you mean "
                                           r"'pigeon'\?\) \(installed: .*pigeon"):
        registry.channel_class("pigon")
    ws = make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            "  sms: {type: pigeon, loft: north.jsonl, token: \"t\"}\n"
            "  email: {type: outbox, kind: email}\n"),
        "config/flows/promo.yaml": PROMO_YAML}, rows=20)
    summary = engine.run_local(ws, "promo", run_key="pigeon")
    lines = (ws.root / "north.jsonl").read_text().splitlines()
    pigeon = {k: v[0] for k, v in ledger_rows(ws, "status", where="channel = 'sms'").items()}
    assert len(lines) == len(pigeon) and "failed" in pigeon.values()
    assert summary["by_channel"]["sms"]["sent"] == sum(
        1 for s in pigeon.values() if s == "sent")


def test_a_third_party_channel_settings_are_validated_with_its_model(
        make_workspace, pigeon_installed) -> None:
    from herald.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config/herald.yaml:5 channels.sms.loft: "
                                          r"required key is missing"):
        make_workspace({"config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            "  sms: {type: pigeon, token: \"t\"}\n  email: {type: outbox, kind: email}\n")})
