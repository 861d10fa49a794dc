"""The embedded MiniLM model: offline, normalised, semantically useful."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from memosd.embed import MiniLMEmbedder, QueryCache, cpu_has_native_bf16, resolve_embed_dtype
from memosd.engine import Engine
from memosd.index import IndexSettings, SearchService


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder(threads=1)


def test_minilm_is_offline_and_normalised(minilm: MiniLMEmbedder) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert (minilm.model_name, minilm.dim) == ("all-MiniLM-L6-v2", 384)
    vectors = minilm.embed(["hello", "world", ""])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, atol=1e-5)
    cache = QueryCache(minilm, size=2)
    first = cache.embed_query("hello")
    assert cache.embed_query("hello") is first
    assert cache.stats()["hits"] == 1


def test_semantic_ranking(minilm: MiniLMEmbedder, tmp_path: Path) -> None:
    with Engine.open(tmp_path) as engine:
        svc = SearchService(
            engine, tmp_path, embedder=minilm, settings=IndexSettings(snapshot_interval_s=0)
        )
        svc.start()
        engine.create_cube("me", owner="uid:1", config=svc.cube_config())
        for text in (
            "I live in Berlin",
            "My sister plays the violin",
            "We adopted a puppy last spring",
            "I work as a nurse at the hospital",
        ):
            engine.add("me", text)
        lsn = engine.applied_lsn
        hits = svc.search(["me"], "where do I live", k=2, mode="dense", wait_for_lsn=lsn)
        assert hits[0].item.text == "I live in Berlin"
        hits = svc.search(["me"], "what is my job", k=1, mode="dense")
        assert hits[0].item.text == "I work as a nurse at the hospital"
        hits = svc.search(["me"], "do we have a dog", k=1)
        assert hits[0].item.text == "We adopted a puppy last spring"
        svc.close()


def test_token_counts_are_what_a_batch_is_padded_to(minilm: MiniLMEmbedder) -> None:
    # [CLS] and [SEP] included; a long text is cut at the model's 256 tokens.
    assert minilm.token_counts(["hello", "hello world", "word " * 400]) == [3, 4, 256]
    assert minilm.token_counts([]) == []


def test_a_sorted_batch_embeds_each_text_as_alone(minilm: MiniLMEmbedder) -> None:
    texts = ["hi", "a much longer sentence about the weather in Berlin last spring", "ok then"]
    together = minilm.embed(texts)
    alone = np.stack([minilm.embed([t])[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-5)


def test_one_text_embeds_as_in_a_batch(minilm: MiniLMEmbedder) -> None:
    # A single text (a query) skips encode(); the vector is the same.
    texts = ["where do I live", "I live in Berlin"]
    batch = minilm.embed(texts)
    for i, text in enumerate(texts):
        assert np.allclose(minilm.embed([text])[0], batch[i], atol=1e-6)


def test_bfloat16_vectors_match_float32(minilm: MiniLMEmbedder) -> None:
    # The bfloat16 model (what `auto` picks on a CPU with AVX512-BF16/AMX) gives
    # float32 unit vectors within cosine 0.999 of the float32 model's, one text
    # (the query path) and a batch alike, so both can share one index.
    exact = MiniLMEmbedder(threads=1, dtype="float32")
    half = MiniLMEmbedder(threads=1, dtype="bfloat16")
    assert (exact.dtype, half.dtype) == ("float32", "bfloat16")
    texts = [
        "We adopted a puppy last spring",
        "Caroline went to an LGBTQ support group on 7 May",
        "what is my job",
    ]
    for batch in ([texts[0]], texts):
        a, b = exact.embed(batch), half.embed(batch)
        assert b.dtype == np.float32
        assert b.shape == a.shape
        assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
        assert (a * b).sum(axis=1).min() > 0.999
    # Not the same numbers, though: the setting really changed the weights.
    assert not np.array_equal(exact.embed(texts), half.embed(texts))


def test_auto_dtype_follows_the_cpu_flags() -> None:
    with_bf16 = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
    with_amx = "flags\t: fpu avx2 amx_tile amx_bf16\n"
    without = "flags\t: fpu sse2 avx2 avx512f avx512bw\n"
    assert cpu_has_native_bf16(with_bf16)
    assert cpu_has_native_bf16(with_amx)
    assert not cpu_has_native_bf16(without)
    assert not cpu_has_native_bf16("no flags line at all")
    assert resolve_embed_dtype("auto", cpuinfo=with_bf16) == "bfloat16"
    assert resolve_embed_dtype("auto", cpuinfo=without) == "float32"
    assert resolve_embed_dtype("auto", device="cuda", cpuinfo=with_bf16) == "float32"
    assert resolve_embed_dtype("float32", cpuinfo=with_bf16) == "float32"
    assert resolve_embed_dtype("bfloat16", cpuinfo=without) == "bfloat16"
    with pytest.raises(ValueError, match="embedding dtype"):
        resolve_embed_dtype("int8")
