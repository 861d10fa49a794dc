"""Search indexes: hybrid dense (faiss) + lexical (BM25) retrieval over cubes.

Design (details in docs/retrieval.md):

* **Pure pieces** - :mod:`~memosd.index.bm25` (tokenizer, incremental BM25),
  :mod:`~memosd.index.fusion` (reciprocal rank fusion, boosts),
  :mod:`~memosd.index.filters` (tier, form, tags, session, time, status, as_of).
* **Per-cube state** - :mod:`~memosd.index.dense` (faiss: exact flat inner
  product while small, HNSW past ``hnsw_threshold``, built in the background and
  swapped without downtime) and :mod:`~memosd.index.cube` (id maps + BM25 +
  dense, one label per indexed item version).  Only the latest active version
  of each item is indexed.
* **I/O** - :mod:`~memosd.index.indexer` consumes the engine's change events in
  a worker thread, batches embeddings across cubes, and advances
  ``indexed_lsn`` (writes never wait for embedding; searches may wait for an
  LSN: read-your-writes).  :mod:`~memosd.index.snapshot` persists each cube's
  index with the LSN it covers (checksummed, no pickle); a restart loads it and
  replays only ``engine.changes_since(lsn)``.
* **The facade** - :class:`~memosd.index.service.SearchService`, the one
  object the daemon uses.
"""

from __future__ import annotations

from memosd.index.filters import SearchFilters
from memosd.index.fusion import Boosts
from memosd.index.service import MODES, SearchHit, SearchService
from memosd.index.settings import IndexSettings

__all__ = ["MODES", "Boosts", "IndexSettings", "SearchFilters", "SearchHit", "SearchService"]
