"""Optimize DSPy programs on Ray: parallel MIPROv2 and DSPy's own optimizers, resumable, with artifacts.

    python -m optimize --task triage --optimizer miprov2 --auto light --workers 4 --out artifacts/
"""
