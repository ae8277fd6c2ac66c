"""Endpoint settings precedence, secret handling, and the one program loader."""

import json

import pytest

from dspy_ray.execution.artifacts import ProgramLoadError
from dspy_ray.execution.loading import ProgramSpec, load_program
from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from programs.triage import CallTriager, DetailExtractor

TRIAGE = ProgramSpec("triage", CallTriager)


def test_flags_beat_env_beat_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LM_BASE_URL=http://dotenv/v1\nLM_MODEL=from-dotenv\nLM_API_KEY=sk-dotenv\n")
    env = {"LM_MODEL": "from-env"}
    s = resolve_settings("LM", flags={"base_url": "http://flag/v1", "model": None}, env=env, dotenv_path=dotenv)
    assert s.base_url == "http://flag/v1"  # flag
    assert s.model == "from-env"  # env beats .env; a None flag is "not given"
    assert s.api_key.get_secret_value() == "sk-dotenv"  # only .env had it
    assert s.origin == "configured"


def test_roles_are_separate_and_checked():
    env = {"LM_MODEL": "target", "JUDGE_MODEL": "judge", "EMBED_MODEL": "e5", "EMBED_BATCH_SIZE": "16"}
    assert resolve_settings("JUDGE", env=env, dotenv_path=None).model == "judge"
    assert resolve_settings("LM", env=env, dotenv_path=None).model == "target"
    embed = resolve_settings("EMBED", env=env, dotenv_path=None)
    assert (embed.model, embed.batch_size) == ("e5", 16)
    with pytest.raises(ValueError, match="unknown endpoint role"):
        resolve_settings("LLM", env=env, dotenv_path=None)


def test_api_key_never_printed():
    s = EndpointSettings(base_url="http://user:pw@x/v1?key=abc", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(s)
    assert "sk-secret-123" not in str(s.redacted())
    assert "sk-secret-123" not in s.model_dump_json()
    assert s.redacted()["base_url"] == "http://x/v1"  # no credentials in the URL either
    assert s.with_key()["api_key"] == "sk-secret-123"  # only for constructor arguments


def test_embedded_when_no_url():
    assert EndpointSettings().embedded
    assert not EndpointSettings(base_url="http://x/v1").embedded


def test_program_roundtrip_json(tmp_path):
    program = load_program(TRIAGE).program
    program.triage.signature = program.triage.signature.with_instructions("Be terse.")
    path = tmp_path / "triage.json"
    program.save(str(path))
    loaded = load_program(CallTriager, path)
    assert loaded.program.triage.signature.instructions == "Be terse."
    assert loaded.path == str(path) and loaded.metadata is None


def test_program_mismatch_names_file_and_predictor(tmp_path):
    path = tmp_path / "triage.json"
    load_program(TRIAGE).program.save(str(path))
    with pytest.raises(ProgramLoadError) as err:
        load_program(DetailExtractor, path)
    assert str(path) in str(err.value) and "'extract'" in str(err.value)


def test_program_field_count_mismatch(tmp_path):
    path = tmp_path / "triage.json"
    load_program(TRIAGE).program.save(str(path))
    state = json.loads(path.read_text())
    state["triage"]["signature"]["fields"].pop()
    path.write_text(json.dumps(state))
    with pytest.raises(ProgramLoadError, match="predictor 'triage' has 3 signature fields"):
        load_program(TRIAGE, path)


def test_program_refuses_pickle_and_bad_json(tmp_path):
    with pytest.raises(ProgramLoadError, match="pickled"):
        load_program(TRIAGE, tmp_path / "p.pkl")
    bad = tmp_path / "bad.json"
    bad.write_text('{"triage": {\n  "demos": [,]\n}}')
    with pytest.raises(ProgramLoadError, match=r"bad.json line 2: invalid JSON"):
        load_program(TRIAGE, bad)


def test_import_path_and_unknown_program():
    assert load_program("programs.triage:CallTriager").program.__class__ is CallTriager
    with pytest.raises(ProgramLoadError, match="cannot be imported"):
        load_program("programs.triage:Nope")
