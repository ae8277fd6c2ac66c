"""A fault-injecting fake OpenAI-compatible server (chat completions, embeddings) for tests and benchmarks.

The server runs in its own process (so its CPU does not compete with the client
being measured) and listens on 127.0.0.1 only.  Every ``POST /v1/chat/completions``
request goes through these steps:

1. **capacity** - at most ``capacity`` requests are worked on at once; the rest
   wait in a FIFO queue.  ``capacity=None`` is unlimited.  With ``reject_over=n``
   a chat request that finds every slot busy and ``n`` requests already waiting
   is answered 429 + ``Retry-After`` at once (``reject_over=0``: no queue at all,
   like an endpoint that refuses what it cannot hold); ``None`` queues them all.
2. **fault draw** - one number from ``random.Random(seed)`` decides the outcome:
   ``p_429`` (HTTP 429 + ``Retry-After``), ``p_500`` (HTTP 500), ``p_hang``
   (sleep ``hang_seconds``; cancelled on client disconnect or shutdown) or
   ``p_malformed`` (HTTP 200 whose content is unparseable prose).  429 and 500
   answer at once; everything else first sleeps ``latency`` seconds.
3. **answer** - a deterministic, valid answer built from what DSPy sent: the JSON
   schema in ``response_format`` when there is one, otherwise the output fields
   listed in the system message (ChatAdapter ``[[ ## field ## ]]`` format or a JSON
   object).  Literal/enum values are picked with a stable hash of the field name
   and the last user message, so the same input always gets the same answer.
   In few-shot mode (``gold``) an input's correct values replace those for the
   values its prompt teaches (shown by a demo, or ``gold_keyword`` in the
   instruction), so prompt optimization measurably raises a metric.

Usage::

    from dspy_ray.testing.fake_llm import FakeLLM

    with FakeLLM(latency=0.25, capacity=128, p_429=0.05, retry_after=0.5, seed=0) as fake:
        lm = dspy.LM("openai/fake-model", api_base=fake.base_url, api_key="x", cache=False)
        ...
        fake.configure(p_429=0.0)       # change any setting while it runs
        fake.stats()["rate_limited"]    # outcome counters, peak concurrency, distinct inputs
        fake.reset_stats()
        fake.samples()                  # with sample_interval: (seconds, in flight, queued, ...) rows

Standalone (prints the base URL, serves until killed)::

    python -m dspy_ray.testing.fake_llm --port 8001 --latency 0.1 --p-429 0.05

It runs on uvloop where that is installed (``FAKE_LLM_UVLOOP=0``: asyncio's own loop).

``POST /v1/embeddings`` answers deterministic hashed bag-of-words vectors
(:func:`hashed_embedding`: each lower-cased word adds +-1 to one of ``embed_dim``
coordinates chosen by its hash, then L2 normalised), so texts sharing words are
close and retrieval over the fake is meaningful.  It goes through the same
capacity slots and fault draw as chat (429, 500, hang; ``p_malformed`` answers
200 without a ``data`` list), answers ``encoding_format`` ``float`` or ``base64``,
rejects (400) a request holding an input longer than ``embed_max_chars`` (when
set), and requires ``Authorization: Bearer <embed_api_key>`` (when set).  Its
counters are ``stats()["embeddings"]``: requests, inputs, and outcomes.

Admin endpoints: ``GET /health``, ``GET /v1/models``, ``GET|POST /admin/config``,
``GET /admin/stats``, ``GET /admin/samples``, ``POST /admin/reset``.

The package, bottom up (each module imports only those above it):

* :mod:`.settings` - :class:`FakeSettings`, the fault knobs and :func:`draw_fault`, ``HOST`` and the banner;
* :mod:`.prompt` - reading what DSPy sent: output fields, JSON schemas, demos (pure text parsing);
* :mod:`.answers` - the deterministic answer, :func:`hashed_embedding`, the response bodies;
* :mod:`.capacity` - :class:`Capacity`: the slots, the FIFO queue and the in-flight gauges;
* :mod:`.server` - :class:`FakeServer`, the aiohttp app (run in the child process only);
* :mod:`.cli` (and ``__main__``) - the command line the child runs;
* :mod:`.process` - :class:`FakeLLM`, the parent's handle: starts and stops the child, the admin client.

aiohttp is imported only inside the server's methods, so importing this package never loads it.
"""

from dspy_ray.testing.fake_llm.answers import (
    MALFORMED_CONTENT,
    annotation_value,
    answer_content,
    answer_fields,
    completion_body,
    embedding_body,
    hashed_embedding,
    input_key,
    schema_value,
    taught_values,
)
from dspy_ray.testing.fake_llm.capacity import Capacity
from dspy_ray.testing.fake_llm.cli import main, parse_args
from dspy_ray.testing.fake_llm.process import MODULE, ROOT, FakeLLM
from dspy_ray.testing.fake_llm.prompt import demo_values, output_fields, schema_notes
from dspy_ray.testing.fake_llm.server import FakeServer
from dspy_ray.testing.fake_llm.settings import BANNER, FAULTS, HOST, FakeSettings, draw_fault

__all__ = [
    "BANNER",
    "FAULTS",
    "HOST",
    "MALFORMED_CONTENT",
    "MODULE",
    "ROOT",
    "Capacity",
    "FakeLLM",
    "FakeServer",
    "FakeSettings",
    "annotation_value",
    "answer_content",
    "answer_fields",
    "completion_body",
    "demo_values",
    "draw_fault",
    "embedding_body",
    "hashed_embedding",
    "input_key",
    "main",
    "output_fields",
    "parse_args",
    "schema_notes",
    "schema_value",
    "taught_values",
]
