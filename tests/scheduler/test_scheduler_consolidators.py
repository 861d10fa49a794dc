"""Consolidators: extractive merging; the OpenAI-compatible one against a local fake server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import pytest

from memosd.embed import HashingEmbedder
from memosd.errors import PluginError, Unavailable
from memosd.scheduler.consolidate import (
    ExtractiveConsolidator,
    FactDraft,
    OpenAICompatibleConsolidator,
    SourceTurn,
)

TURNS = [
    SourceTurn("T1", 2, "Alice: Hi! I planted tomatoes near the fence. Want some?"),
    SourceTurn("T2", 2, "Alice: I planted tomatoes near the fence. The roses need water daily."),
    SourceTurn("T3", 3, "Bob: ok"),
]


def test_extractive_keeps_informative_sentences_and_merges_duplicates() -> None:
    drafts = ExtractiveConsolidator(HashingEmbedder(512)).consolidate(TURNS)
    assert drafts == [
        FactDraft("Alice: I planted tomatoes near the fence.", (("T1", 2), ("T2", 2))),
        FactDraft("Alice: The roses need water daily.", (("T2", 2),)),
    ]


def test_extractive_caps_facts_per_segment() -> None:
    turns = [
        SourceTurn(f"T{i}", 1, f"Unique fact number {i} about topic {i * 7}.") for i in range(9)
    ]
    drafts = ExtractiveConsolidator(HashingEmbedder(512), max_facts=3).consolidate(turns)
    assert len(drafts) == 3


class _FakeLLM(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []
    reply: ClassVar[bytes] = b""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": json.loads(body)}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_llm() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _completion(content: dict[str, Any]) -> bytes:
    return json.dumps({"choices": [{"message": {"content": json.dumps(content)}}]}).encode()


def test_openai_consolidator_against_a_local_fake_server(
    fake_llm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LLM_KEY", "sekret")
    _FakeLLM.requests = []
    _FakeLLM.reply = _completion(
        {
            "facts": [
                {"text": "Alice grows tomatoes by the fence.", "sources": [1, 2]},
                {"text": "Alice waters roses daily.", "sources": [2, 99]},
                {"text": "", "sources": [1]},
            ]
        }
    )
    consolidator = OpenAICompatibleConsolidator(
        fake_llm + "/", "tiny-model", api_key_env="FAKE_LLM_KEY", timeout_s=5
    )
    drafts = consolidator.consolidate(TURNS)
    assert drafts == [
        FactDraft("Alice grows tomatoes by the fence.", (("T1", 2), ("T2", 2))),
        FactDraft("Alice waters roses daily.", (("T2", 2),)),
    ]
    [request] = _FakeLLM.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sekret"
    body = request["body"]
    assert body["model"] == "tiny-model"
    assert body["temperature"] == 0
    assert body["messages"][0]["role"] == "system"
    assert "[1] Alice: Hi! I planted tomatoes" in body["messages"][1]["content"]
    assert "[3] Bob: ok" in body["messages"][1]["content"]


def test_openai_consolidator_errors_are_not_swallowed(fake_llm: str) -> None:
    _FakeLLM.reply = b'{"choices": []}'
    consolidator = OpenAICompatibleConsolidator(fake_llm, "m", timeout_s=5)
    with pytest.raises(PluginError, match="unexpected format"):
        consolidator.consolidate(TURNS)
    closed = OpenAICompatibleConsolidator("http://127.0.0.1:9/v1", "m", timeout_s=2)
    with pytest.raises(Unavailable):
        closed.consolidate(TURNS)
    with pytest.raises(PluginError):
        OpenAICompatibleConsolidator("", "m")


def test_policy_picks_consolidators_by_name() -> None:
    from memosd.errors import NotFound
    from memosd.scheduler.policies_builtin import PlaintextTierPolicy
    from memosd.scheduler.tiers import TierSettings

    policy = PlaintextTierPolicy(HashingEmbedder(64))
    assert isinstance(policy.consolidator_for(TierSettings()), ExtractiveConsolidator)
    chosen = policy.consolidator_for(
        TierSettings(consolidator="openai", llm_endpoint="http://127.0.0.1:1/v1", llm_model="m")
    )
    assert isinstance(chosen, OpenAICompatibleConsolidator)
    assert chosen.endpoint == "http://127.0.0.1:1/v1"
    seen: dict[str, Any] = {}

    def custom(*, embedder: Any, **settings: Any) -> ExtractiveConsolidator:
        seen.update(settings)
        return ExtractiveConsolidator(embedder, max_facts=1)

    policy.use_consolidators({"custom": custom, "extractive": custom})
    assert isinstance(
        policy.consolidator_for(TierSettings(consolidator="custom")), ExtractiveConsolidator
    )
    assert seen["short_capacity"] == 10
    assert policy.consolidator_for(TierSettings()).max_facts == 20  # built-in kept
    with pytest.raises(NotFound):
        policy.consolidator_for(TierSettings(consolidator="nope"))
