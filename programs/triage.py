"""911-call triage programs: pure DSPy, no Ray, no retries, no I/O.

The same classes are run by the batch stages, compiled by the optimizers and
hosted by Serve.

    >>> triager = CallTriager()
    >>> [name for name, _ in triager.named_predictors()]
    ['triage']
"""

from typing import Literal

import dspy

from programs.demo_pool import NearestDemos

Priority = Literal["urgent", "non_urgent", "not_an_emergency"]
Category = Literal["crime", "medical", "fire", "animal", "noise", "other"]


class TriageCall(dspy.Signature):
    """Triage an incoming 911 call: a one-line summary, the kind of incident, and how urgent it is."""

    # Field order matters to small models: writing the summary first makes them read the call before
    # choosing labels (measured in benchmarks/embedded_triage_quality.py: with priority first, SmolLM2-135M
    # answered "urgent" for every call).
    transcript: str = dspy.InputField(desc="what the caller said")
    summary: str = dspy.OutputField(desc="one sentence for the dispatcher")
    category: Category = dspy.OutputField(desc="the kind of incident")
    priority: Priority = dspy.OutputField(
        desc="urgent: life or property in immediate danger; non_urgent: needs a response but no one is in danger; "
        "not_an_emergency: no police, fire or medical response needed"
    )


class CallTriager(dspy.Module):
    """Triage with a single prediction; a large demo pool (an artifact of ``--optimizer knn``) is shown per
    call as the demos nearest to the transcript (:mod:`programs.demo_pool`)."""

    def __init__(self):
        super().__init__()
        self.triage = dspy.Predict(TriageCall)
        self.nearest = NearestDemos(k=2, pool_threshold=16)

    def forward(self, transcript: str) -> dspy.Prediction:
        demos = self.nearest.select(self.triage.demos, "transcript", transcript)
        return self.triage(transcript=transcript, demos=demos)

    # The same call for asyncio (``await program.acall(...)``): a batch stage or a Serve replica then
    # keeps its rows in flight on its event loop, with no thread per row.
    async def aforward(self, transcript: str) -> dspy.Prediction:
        demos = self.nearest.select(self.triage.demos, "transcript", transcript)
        return await self.triage.acall(transcript=transcript, demos=demos)


class ExtractDetails(dspy.Signature):
    """Extract the actionable details a dispatcher needs from a 911 call."""

    transcript: str = dspy.InputField(desc="what the caller said")
    location: str = dspy.OutputField(desc="the reported location, or 'unknown' if none is mentioned")
    subject_description: str = dspy.OutputField(
        desc="the person, animal or thing involved, or 'none' if nobody is described"
    )


class DetailExtractor(dspy.Module):
    def __init__(self):
        super().__init__()
        self.extract = dspy.Predict(ExtractDetails)

    def forward(self, transcript: str) -> dspy.Prediction:
        return self.extract(transcript=transcript)

    async def aforward(self, transcript: str) -> dspy.Prediction:
        return await self.extract.acall(transcript=transcript)
