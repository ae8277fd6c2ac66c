"""The GPU cluster: cluster.yaml, the Serve LLM models file, endpoint discovery.

Everything here runs offline on a CPU machine: cluster.yaml goes through Ray's own
defaults and schema code (the steps of `ray up` before it calls AWS), the models file
becomes real ``LLMConfig`` objects (the pydantic model ``ray.serve.llm`` re-exports; it
needs no vLLM), and discovery runs against the fake OpenAI endpoint and a small Serve app.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from dspy_ray.endpoints.discovery import discover_endpoints, list_models, serve_app_base_url
from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from serve import vllm_models as serve_llm

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
MODELS_YAML = ROOT / "serve" / "llm_models.yaml"


# -- cluster.yaml -------------------------------------------------------------------


@pytest.fixture
def cluster_raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def no_aws(monkeypatch):
    """Fail the test if anything tries to build an AWS client."""
    import boto3
    import boto3.session

    def refuse(*args, **kwargs):
        raise AssertionError("offline validation must not contact AWS")

    for target in (boto3, boto3.session.Session):
        monkeypatch.setattr(target, "client", refuse)
        monkeypatch.setattr(target, "resource", refuse)


def prepared(config: dict) -> dict:
    """What `ray up` does before its provider-specific (AWS) bootstrap: defaults, then the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))  # defaults.yaml merge, per-type min/max, setup merge
    validate_config(config)  # ray-schema.json plus Ray's own cross-field checks
    return config


def test_cluster_yaml_passes_rays_validation(cluster_raw, no_aws):
    config = prepared(cluster_raw)
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] == "head"
    assert types["head"]["max_workers"] == 0  # filled in by Ray for the head type
    assert sum(t["min_workers"] for t in types.values()) <= config["max_workers"]


def test_cluster_yaml_meets_the_issue(cluster_raw, no_aws):
    config = prepared(cluster_raw)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}

    # Head: CPU instance, advertises no GPU (and no CPU, so no tasks land there).
    assert head["node_config"]["InstanceType"].startswith("m5.")
    assert head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"]  # the head must not be preempted

    # Spot H100 workers that scale to zero, and an on-demand fallback of the same shape.
    spot = workers["gpu_h100_spot"]
    assert spot["node_config"]["InstanceType"] == "p5.48xlarge"
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert spot["resources"]["GPU"] == 8 and spot["resources"]["accelerator_type:H100"] == 1
    assert spot["max_workers"] >= 1
    fallback = workers["gpu_h100_ondemand"]
    assert "InstanceMarketOptions" not in fallback["node_config"]
    assert fallback["node_config"]["InstanceType"] == spot["node_config"]["InstanceType"]
    assert fallback["resources"] == spot["resources"]
    assert spot["priority"] > fallback["priority"]  # spot is tried first
    assert all(t["min_workers"] == 0 for t in workers.values())

    # Every node has an instance profile (S3 for runs; no default EC2+S3 full-access role).
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())

    # The project with its [cluster] extra is installed on the head and on every worker.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "-e" in c and "dspy-ray[cluster]" in c for c in config[key]), key

    # .env is neither mounted nor copied along with the repository.
    mounts = config["file_mounts"]
    assert not any(".env" in str(k) or ".env" in str(v) for k, v in mounts.items())
    assert "~/dspy-ray" in mounts
    assert ".env" in config["rsync_exclude"]
    assert ".env" in (ROOT / ".gitignore").read_text().split()  # rsync_filter: .gitignore covers it too


def test_gpu_workers_match_the_models_accelerator(cluster_raw):
    models = serve_llm.load_models(MODELS_YAML)
    gpu_resources = {k for t in cluster_raw["available_node_types"].values() for k in t["resources"]}
    for spec in models.models:
        assert f"accelerator_type:{spec.accelerator_type}" in gpu_resources, spec.model_id
        assert spec.tensor_parallel_size <= 8  # a replica must fit on one p5.48xlarge


@pytest.mark.parametrize(
    "mutate, names",
    [
        (lambda c: c.update(max_worker=c.pop("max_workers")), "max_worker"),  # misspelled top-level key
        (lambda c: c.update(max_workers="8"), "'8'"),  # wrong type
        (lambda c: c["available_node_types"]["gpu_h100_spot"].update(min_worker=0), "min_worker"),
        (lambda c: c["available_node_types"]["gpu_h100_spot"]["resources"].update(GPU=0.5), "0.5"),
        (lambda c: c.update(setup_command=c.pop("setup_commands")), "setup_command"),
        (lambda c: c.update(head_node_type="haed"), "head_node_type"),
    ],
    ids=["top-level-typo", "wrong-type", "node-type-typo", "fractional-resource", "commands-typo", "bad-head"],
)
def test_cluster_yaml_typos_fail_validation(cluster_raw, mutate, names, no_aws):
    import jsonschema

    mutate(cluster_raw)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)) as info:
        prepared(cluster_raw)
    assert names in str(info.value)


# -- serve/llm_models.yaml -> LLMConfig ------------------------------------------


def test_models_file_becomes_llm_configs():
    models = serve_llm.load_models(MODELS_YAML)
    configs = serve_llm.llm_configs(models)
    assert [type(c).__name__ for c in configs] == ["LLMConfig", "LLMConfig", "LLMConfig"]
    by_role = dict(zip((m.role for m in models.models), configs, strict=True))
    assert set(by_role) == {"target", "judge", "embedder"}
    assert by_role["target"].model_id != by_role["judge"].model_id

    for spec, cfg in zip(models.models, configs, strict=True):
        assert cfg.model_id == spec.model_id
        assert cfg.accelerator_type == "H100"
        engine = cfg.engine_kwargs
        if spec.role == "embedder":  # a pooling model: /v1/embeddings, no decoding settings
            assert engine["runner"] == "pooling" and "structured_outputs_config" not in engine
        else:
            assert engine["enable_prefix_caching"] is True
            assert engine["structured_outputs_config"]["backend"] in ("xgrammar", "guidance", "auto")
        assert engine["tensor_parallel_size"] == spec.tensor_parallel_size
        assert engine["gpu_memory_utilization"] == spec.gpu_memory_utilization
        auto = cfg.deployment_config["autoscaling_config"]
        # Set explicitly: Ray's LLM default target (1e9 per replica) never scales up.
        assert 0 < auto["target_ongoing_requests"] < 1e6
        assert auto["min_replicas"] <= auto["max_replicas"]
        assert auto["max_replicas"] >= 1
    assert by_role["judge"].engine_kwargs["tensor_parallel_size"] == 4

    # Routes: one app at /llm; the OpenAI base path clients and discovery use.
    assert models.app_name == "llm"
    assert models.base_path() == "/llm/v1"
    assert models.roles() == {role: cfg.model_id for role, cfg in by_role.items()}
    assert models.prefixes("embedder") == ("query: ", "passage: ")


def test_dry_run_prints_configs_and_starts_nothing(capsys, monkeypatch):
    def no_deploy(*args, **kwargs):
        raise AssertionError("--dry-run must not deploy")

    monkeypatch.setattr(serve_llm, "_deploy", no_deploy)
    assert serve_llm.main(["--config", str(MODELS_YAML), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["openai_base_path"] == "/llm/v1"
    assert [c["model_loading_config"]["model_id"] for c in out["llm_configs"]] == list(out["roles"].values())
    assert all(c["engine_kwargs"].get("enable_prefix_caching") or c["engine_kwargs"].get("runner") == "pooling"
               for c in out["llm_configs"])


def _write_models(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(MODELS_YAML.read_text())
    mutate(data)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "mutate, names",
    [
        (lambda d: d["models"][0].update(tensor_paralel_size=2), ["models.0.tensor_paralel_size", "unknown field"]),
        (lambda d: d["models"][1].update(max_replicas="many"), ["models.1.max_replicas", "72B"]),
        (lambda d: d.update(route_prefx="/x"), ["route_prefx", "unknown field"]),
        (lambda d: d["models"][0].update(min_replicas=5, max_replicas=2), ["min_replicas (5) > max_replicas (2)"]),
        (lambda d: d["models"][0].update(extra_engine_kwargs={"enable_prefix_caching": False}),
         ["extra_engine_kwargs", "enable_prefix_caching"]),
        (lambda d: d["models"][1].update(role="target"), ["role", "repeated"]),
        (lambda d: d["models"][0].update(gpu_memory_utilization=1.5), ["gpu_memory_utilization"]),
    ],
    ids=["typo", "wrong-type", "top-level-typo", "min-over-max", "shadowed-engine-kwarg", "two-targets",
         "out-of-range"],
)
def test_models_file_errors_name_the_field(tmp_path, capsys, mutate, names):
    path = _write_models(tmp_path, mutate)
    with pytest.raises(serve_llm.LLMModelsError) as info:
        serve_llm.load_models(path)
    message = str(info.value)
    assert str(path) in message
    for name in names:
        assert name in message
    assert serve_llm.main(["--config", str(path), "--dry-run"]) == 2
    assert names[0] in capsys.readouterr().err


def test_llm_config_rejects_an_unknown_accelerator(tmp_path):
    path = _write_models(tmp_path, lambda d: d["models"][0].update(accelerator_type="H1000"))
    with pytest.raises(serve_llm.LLMModelsError, match="Unsupported accelerator type: H1000"):
        serve_llm.llm_configs(serve_llm.load_models(path))


def test_serve_config_with_llm_app_is_a_valid_serve_config(capsys):
    from ray.serve.schema import ServeDeploySchema

    assert serve_llm.main(["--config", "serve/llm_models.yaml", "--serve-config", "serve_config.yaml",
                           "--http-host", "0.0.0.0"]) == 0
    combined = ServeDeploySchema.model_validate(yaml.safe_load(capsys.readouterr().out))
    apps = {a.name: a for a in combined.applications}
    assert apps["llm"].import_path == serve_llm.IMPORT_PATH
    assert apps["llm"].route_prefix == "/llm"
    assert apps["llm"].args == {"config": "serve/llm_models.yaml"}
    assert "triage" in apps  # the existing app is kept
    assert combined.http_options.host == "0.0.0.0"

    models = serve_llm.load_models(MODELS_YAML)
    clash = {"applications": [{"name": "other", "route_prefix": "/llm", "import_path": "x:y"}]}
    with pytest.raises(serve_llm.LLMModelsError, match="already used"):
        serve_llm.serve_config_with_llm(clash, models)


def test_build_app_without_vllm_says_what_is_missing():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here; build_app would really build the app")
    with pytest.raises(RuntimeError, match=r"\[cluster\] extra"):
        serve_llm.build_app(serve_llm.load_models(MODELS_YAML))


# -- discovery --------------------------------------------------------------------


def discover(lm, judge, **kwargs):
    found = discover_endpoints({"LM": lm, "JUDGE": judge}, **kwargs)
    return found["LM"], found["JUDGE"]


def _models_file(tmp_path: Path, target: str, judge: str, app_name: str = "llm", prefix: str = "/llm") -> Path:
    data = {
        "app_name": app_name,
        "route_prefix": prefix,
        "models": [{"role": "target", "model_id": target}, {"role": "judge", "model_id": judge}],
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_discovery_maps_served_model_ids_to_roles(fake_llm, tmp_path):
    models = _models_file(tmp_path, target="fake-model", judge="judge-model")
    empty = resolve_settings("LM", env={}, dotenv_path=None)
    assert list_models(fake_llm.base_url) == ["fake-model"]

    lm, judge = discover(empty, empty, models_config=models, base_url=fake_llm.base_url)
    assert (lm.base_url, lm.model) == (fake_llm.base_url, "fake-model")
    assert judge == empty  # judge-model is not served there: left for the caller's fallback

    fake_llm.configure(model="judge-model")
    lm, judge = discover(empty, empty, models_config=models, base_url=fake_llm.base_url)
    assert lm == empty
    assert (judge.base_url, judge.model) == (fake_llm.base_url, "judge-model")
    assert judge.max_in_flight == empty.max_in_flight  # nothing else changes


def test_explicit_base_url_is_never_overridden(fake_llm, tmp_path, monkeypatch):
    models = _models_file(tmp_path, target="fake-model", judge="fake-model-judge")
    explicit = resolve_settings("LM", env={"LM_BASE_URL": "http://10.9.9.9:1234/v1"}, dotenv_path=None)
    empty_judge = resolve_settings("JUDGE", env={}, dotenv_path=None)

    lm, judge = discover(explicit, empty_judge, models_config=models, base_url=fake_llm.base_url)
    assert lm is explicit
    assert judge is empty_judge  # the judge's model is not served either

    # Both explicit: nothing is probed at all.
    import dspy_ray.endpoints.discovery as discovery

    monkeypatch.setattr(discovery, "list_models", lambda *a, **k: pytest.fail("probed despite explicit URLs"))
    explicit_judge = EndpointSettings(base_url="http://judge.example/v1", model="j")
    assert discover(explicit, explicit_judge, models_config=models) == (explicit, explicit_judge)

    # A configured model id is kept even when the URL is discovered.
    named = EndpointSettings(model="my-model")
    monkeypatch.setattr(discovery, "list_models", lambda *a, **k: ["fake-model"])
    lm, _ = discover(named, None, models_config=models, base_url=fake_llm.base_url)
    assert (lm.base_url, lm.model) == (fake_llm.base_url, "my-model")

    # Judge only (e.g. the drift monitor): no target settings at all.
    monkeypatch.setattr(discovery, "list_models", lambda *a, **k: ["fake-model-judge"])
    lm, judge = discover(None, empty_judge, models_config=models, base_url=fake_llm.base_url)
    assert lm is None and (judge.base_url, judge.model) == (fake_llm.base_url, "fake-model-judge")


def test_no_ray_no_discovery():
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is already connected in this session")
    assert serve_app_base_url("llm") is None
    empty = EndpointSettings()
    assert discover(empty, empty) == (empty, empty)
    assert not ray.is_initialized()  # discovery never starts or joins a cluster


@pytest.mark.slow
def test_discovery_finds_the_serve_app_on_the_cluster(ray_local, tmp_path, free_port):
    """A stand-in for the Serve LLM app (its /v1/models route) found through Serve itself."""
    from ray import serve
    from ray.serve.context import _get_global_client

    served = ["tgt-model", "jdg-model"]

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class ModelList:
        async def __call__(self, request):
            if request.url.path.endswith("/v1/models"):
                return {"object": "list", "data": [{"id": m, "object": "model"} for m in served]}
            return {"error": "not found"}

    started_serve = _get_global_client(raise_if_no_controller_running=False) is None
    if started_serve:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        serve.run(ModelList.bind(), name="llm-test", route_prefix="/llm-test")
        models = _models_file(tmp_path, target="tgt-model", judge="jdg-model", app_name="llm-test",
                              prefix="/llm-test")
        url = serve_app_base_url("llm-test")
        assert url is not None and url.startswith("http://") and url.endswith("/llm-test/v1")
        assert serve_app_base_url("no-such-app") is None

        empty_lm = resolve_settings("LM", env={}, dotenv_path=None)
        empty_judge = resolve_settings("JUDGE", env={}, dotenv_path=None)
        lm, judge = discover(empty_lm, empty_judge, models_config=models)
        assert (lm.base_url, lm.model) == (url, "tgt-model")
        assert (judge.base_url, judge.model) == (url, "jdg-model")

        explicit = resolve_settings("LM", env={"LM_BASE_URL": "http://10.9.9.9:1234/v1"}, dotenv_path=None)
        lm, judge = discover(explicit, empty_judge, models_config=models)
        assert lm is explicit
        assert judge.base_url == url
    finally:
        serve.delete("llm-test")
        if started_serve:
            serve.shutdown()


def test_discovery_fills_the_embedder_with_its_prefixes(fake_llm, tmp_path):
    data = {"models": [{"role": "target", "model_id": "tgt"},
                       {"role": "embedder", "model_id": "fake-model", "query_prefix": "query: ",
                        "passage_prefix": "passage: "}]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    empty = resolve_settings("EMBED", env={}, dotenv_path=None)
    found = discover_endpoints({"EMBED": empty}, models_config=path, base_url=fake_llm.base_url)["EMBED"]
    assert (found.base_url, found.model, found.origin) == (fake_llm.base_url, "fake-model", "discovery")
    assert (found.query_prefix, found.passage_prefix) == ("query: ", "passage: ")
    mine = resolve_settings("EMBED", env={"EMBED_QUERY_PREFIX": "q> "}, dotenv_path=None)
    kept = discover_endpoints({"EMBED": mine}, models_config=path, base_url=fake_llm.base_url)["EMBED"]
    assert kept.query_prefix == "q> " and kept.passage_prefix == "passage: "  # what the user set wins
