"""911-call triage: priority, category and a one-line summary, then location and who is involved.

    python -m pipelines.triage --input data/sample_calls.jsonl --output out/triage
    python -m optimize --task triage --optimizer miprov2 --auto light
    python -m serve --task triage
"""

from dspy_ray.execution.loading import ProgramSpec
from dspy_ray.execution.scoring import JudgedField, TaskMetric
from programs.triage import CallTriager, DetailExtractor
from stages.base import DSPyStage
from tasks.base import CliDefaults, Task, TaskData

TRIAGE = ProgramSpec("triage", CallTriager)
DETAILS = ProgramSpec("extract_details", DetailExtractor)

TASK = Task(
    name="triage",
    description=__doc__.split("\n\n")[0],
    program=TRIAGE,
    stages=(
        DSPyStage(program=TRIAGE, input_fields={"transcript": "transcript"},
                  output_fields=("priority", "category", "summary")),
        DSPyStage(program=DETAILS, input_fields={"transcript": "transcript"},
                  output_fields=("location", "subject_description")),
    ),
    data=TaskData(train="data/triage_train.jsonl", dev="data/triage_dev.jsonl",
                  inputs=("transcript",), labels=("priority", "category")),
    metric=TaskMetric(
        exact=("priority", "category"),
        judged=(JudgedField(
            "summary", reference="summary",
            rubric="Judge a dispatcher's one-line summary of a 911 call against a reference summary. "
                   "good: states the same incident, location and danger as the reference; partial: right "
                   "incident but misses or garbles an important detail; bad: wrong, invented or empty."),),
        live_rubric="Judge a 911-call triage. good: the priority and category are right for what the caller "
                    "said and the summary states the incident faithfully; partial: one of them is wrong or the "
                    "summary misses an important detail; bad: mostly wrong, invented or empty.",
    ),
    cli=CliDefaults(text_column="transcript", summary_columns=("priority", "category"),
                    embedded_artifacts="data/artifacts"),  # made by: python -m optimize --optimizer knn
)
