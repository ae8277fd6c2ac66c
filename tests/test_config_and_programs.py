"""Endpoint settings precedence, secret handling, and the shared program loader."""

import json

import pytest

from programs import CallTriager, ProgramLoadError, load_program
from stages.config import EndpointSettings, dotenv_runtime_env


def test_flags_beat_env_beat_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LM_BASE_URL=http://dotenv/v1\nLM_MODEL=from-dotenv\nLM_API_KEY=sk-dotenv\n")
    env = {"LM_MODEL": "from-env"}
    s = EndpointSettings.resolve("LM", flags={"base_url": "http://flag/v1", "model": None}, env=env, dotenv_path=dotenv)
    assert s.base_url == "http://flag/v1"  # flag
    assert s.model == "from-env"  # env beats .env; a None flag is "not given"
    assert s.api_key.get_secret_value() == "sk-dotenv"  # only .env had it


def test_judge_prefix_is_separate(tmp_path):
    env = {"LM_MODEL": "target", "JUDGE_MODEL": "judge", "JUDGE_TEMPERATURE": "0"}
    assert EndpointSettings.resolve("JUDGE", env=env, dotenv_path=None).model == "judge"
    assert EndpointSettings.resolve("LM", env=env, dotenv_path=None).model == "target"


def test_api_key_never_printed():
    s = EndpointSettings(base_url="http://x/v1", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(s)
    assert "sk-secret-123" not in str(s.redacted())
    assert "sk-secret-123" not in s.model_dump_json()


def test_embedded_when_no_url():
    assert EndpointSettings().embedded
    assert not EndpointSettings(base_url="http://x/v1").embedded


def test_dotenv_reaches_runtime_env(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LM_API_KEY=abc\nEMPTY=\n")
    assert dotenv_runtime_env(dotenv) == {"env_vars": {"LM_API_KEY": "abc", "EMPTY": ""}}
    assert dotenv_runtime_env(tmp_path / "missing.env") == {}


def test_program_roundtrip_json(tmp_path):
    program = load_program("triage")
    program.triage.signature = program.triage.signature.with_instructions("Be terse.")
    path = tmp_path / "triage.json"
    program.save(str(path))
    loaded = load_program(CallTriager, path)
    assert loaded.triage.signature.instructions == "Be terse."


def test_program_mismatch_names_file_and_predictor(tmp_path):
    path = tmp_path / "triage.json"
    load_program("triage").save(str(path))
    with pytest.raises(ProgramLoadError) as err:
        load_program("extract_details", path)
    assert str(path) in str(err.value) and "'extract'" in str(err.value)


def test_program_field_count_mismatch(tmp_path):
    path = tmp_path / "triage.json"
    load_program("triage").save(str(path))
    state = json.loads(path.read_text())
    state["triage"]["signature"]["fields"].pop()
    path.write_text(json.dumps(state))
    with pytest.raises(ProgramLoadError, match="predictor 'triage' has 3 signature fields"):
        load_program("triage", path)


def test_program_refuses_pickle_and_bad_json(tmp_path):
    with pytest.raises(ProgramLoadError, match="pickled"):
        load_program("triage", tmp_path / "p.pkl")
    bad = tmp_path / "bad.json"
    bad.write_text('{"triage": {\n  "demos": [,]\n}}')
    with pytest.raises(ProgramLoadError, match=r"bad.json line 2 column"):
        load_program("triage", bad)
