"""911-call triage: TriageStage -> ExtractDetailsStage over a corpus of transcripts.

    python -m pipelines.triage --input data/sample_calls.jsonl --output out/triage
    ray job submit --working-dir . -- python -m pipelines.triage --input ... --output ...

Output: a parquet dataset with every input column plus priority, category,
summary, location, subject_description and errors (a list, empty when fine).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.inputs import InputSpec
from pipelines.runner import (
    add_common_args,
    lm_settings_from_args,
    main_guard,
    print_result,
    run_pipeline,
    stage_overrides,
)
from stages.triage import ExtractDetailsStage, TriageStage


def build_stages(args: argparse.Namespace) -> list:
    fields = {"transcript": args.text_column}
    return [
        TriageStage(input_fields=fields, **stage_overrides(args, "triage")),
        ExtractDetailsStage(input_fields=fields, **stage_overrides(args, "extract_details")),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.triage", description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    args = parser.parse_args(argv)

    def run() -> None:
        spec = InputSpec(args.input, text_column=args.text_column, id_column=args.id_column,
                         limit=args.limit, max_chars=args.max_chars)
        result = run_pipeline(spec, args.output, build_stages(args), lm_settings_from_args(args),
                              resume=args.resume, summary_columns=("priority", "category"))
        print_result(result)

    return main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
