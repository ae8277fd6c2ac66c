"""``python -m dspy_ray.testing.fake_llm``: serve the fake (see :mod:`dspy_ray.testing.fake_llm.cli`)."""

from dspy_ray.testing.fake_llm.cli import main

if __name__ == "__main__":
    main()
