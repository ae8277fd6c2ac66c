"""Find the target, judge and embedder endpoints of the Serve LLM app running on this Ray cluster.

On a cluster started from ``cluster.yaml`` with the models of
``serve/llm_models.yaml`` deployed (:mod:`serve.vllm_models`), nobody should
have to copy a URL into ``LM_BASE_URL``.  :func:`discover_endpoints` fills it in
(step 4 of the resolution order in :mod:`dspy_ray.endpoints.settings`):

    >>> found = discover_endpoints({"LM": resolve_settings("LM")})   # doctest: +SKIP
    >>> found["LM"].base_url, found["LM"].model                      # doctest: +SKIP
    ('http://10.0.1.23:8000/llm/v1', 'Qwen/Qwen2.5-7B-Instruct')

Precedence: a base URL that is already set (flag, environment or ``.env``)
always wins and is never probed or changed.  Discovery only fills an empty
``base_url`` (and the model, when it is still the default), and only when Ray is
already connected, Serve runs the app and its ``/v1/models`` route lists the
model named for that role in the models file.  In every other case the settings
come back unchanged and the caller keeps its usual fallback (the embedded model).

How: Serve's controller reports the app's route prefix, the proxy's bind
address and port, and where proxies run; the base URL is
``http://<proxy node>:<port><route_prefix>/v1``.  Which served model is the
target and which the judge comes from the ``role`` keys of the models file
(``serve/llm_models.yaml``; ``LLM_MODELS_CONFIG`` names another), checked
against ``GET /v1/models``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from dspy_ray.endpoints.model_catalog import DEFAULT_CONFIG, MODELS_CONFIG_ENV, LLMModelsError, load_models
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.util.cli import EXIT_USAGE
from dspy_ray.util.http import HTTPGetError, get_json

logger = logging.getLogger(__name__)

# Endpoint role (dspy_ray.endpoints.settings) -> role key in the models file.
CATALOG_ROLES = {"LM": "target", "JUDGE": "judge", "EMBED": "embedder"}
PROBE_TIMEOUT_S = 3.0
# Bind addresses meaning "every interface": clients must use the proxy node's IP.
_ANY_HOST = {"0.0.0.0", "::", ""}
_DEFAULT_MODEL = EndpointSettings.model_fields["model"].default


class DiscoveryError(RuntimeError):
    """The served models could not be listed (raised by :func:`list_models` only)."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


def list_models(base_url: str, timeout_s: float = PROBE_TIMEOUT_S, api_key: str = "") -> list[str]:
    """Model ids from an OpenAI-compatible ``GET <base_url>/models``."""
    try:
        payload = get_json(base_url.rstrip("/") + "/models", timeout_s=timeout_s, api_key=api_key)
    except HTTPGetError as exc:
        raise DiscoveryError(str(exc)) from None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise DiscoveryError(f"GET {base_url}/models did not return an OpenAI model list")
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def assign_roles(
    base_url: str, served: Sequence[str], roles: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    """role -> (base_url, model id) for each role whose model is actually served."""
    found = {}
    for role, model_id in roles.items():
        if model_id in served:
            found[role] = (base_url, model_id)
        else:
            logger.warning("discovery: the %s model %r is not served at %s (it lists %s)",
                           role, model_id, base_url, list(served))
    return found


def fill(settings: EndpointSettings, endpoint: tuple[str, str] | None) -> EndpointSettings:
    """``settings`` with an empty base URL (and a default model) taken from ``endpoint``."""
    if endpoint is None or settings.base_url:
        return settings
    base_url, model_id = endpoint
    update = {"base_url": base_url, "origin": "discovery"}
    if settings.model == _DEFAULT_MODEL:
        update["model"] = model_id
    elif settings.model != model_id:
        logger.warning("discovery: keeping the configured model %r; the app serves %r for this role",
                       settings.model, model_id)
    return settings.model_copy(update=update)


def serve_app_base_url(app_name: str) -> str | None:
    """``http://host:port<route_prefix>/v1`` of a RUNNING Serve app on the connected cluster, else None.

    Never starts or connects to Ray: without ``ray.init`` done by the caller it returns None.
    """
    import ray

    if not ray.is_initialized():
        return None
    # Serve's public status() omits the route prefix and the proxy address; the controller's
    # details (what `serve status` and the dashboard show) have both.
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeInstanceDetails

    try:
        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        details = ServeInstanceDetails(**client.get_serve_details())
    except Exception as exc:  # noqa: BLE001 - discovery is best effort; the caller falls back
        logger.info("discovery: Serve is not reachable (%s)", exc)
        return None
    app = details.applications.get(app_name)
    if app is None or app.status != ApplicationStatus.RUNNING:
        logger.info("discovery: Serve app %r is %s", app_name, "absent" if app is None else app.status)
        return None
    http = details.http_options
    port = http.port if http else 8000
    host = http.host if http else "127.0.0.1"
    if host in _ANY_HOST:
        host = _proxy_ip(details)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    prefix = (app.route_prefix or "/").rstrip("/")
    return f"http://{host}:{port}{prefix}/v1"


def _proxy_ip(details) -> str:
    """A proxy's node IP, preferring this node's own proxy (EveryNode) over the head's."""
    import ray

    here = ray.util.get_node_ip_address()
    ips = [p.node_ip for p in details.proxies.values() if p.node_ip]
    return here if here in ips or not ips else ips[0]


def discover_endpoints(
    wanted: Mapping[str, EndpointSettings | None],
    *,
    models_config: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict[str, EndpointSettings | None]:
    """Fill empty base URLs (roles ``LM``, ``JUDGE``, ``EMBED``) from the cluster's Serve LLM app.

    ``models_config``: the models file naming each role's model (default
    ``$LLM_MODELS_CONFIG`` or ``serve/llm_models.yaml``).  ``base_url``: probe
    this OpenAI base URL instead of asking Serve (tests, or an app behind a
    load balancer).  Settings with a base URL come back untouched, and so do
    roles mapped to None.
    """
    out = dict(wanted)
    empty = {role: s for role, s in wanted.items() if s is not None and not s.base_url}
    if not empty:
        return out  # everything explicit: no probe at all
    path = models_config or os.environ.get(MODELS_CONFIG_ENV) or DEFAULT_CONFIG
    try:
        models = load_models(path)
    except LLMModelsError as exc:
        logger.warning("discovery: %s", exc)
        return out
    url = base_url or serve_app_base_url(models.app_name)
    if url is None:
        return out
    try:
        served = list_models(url, timeout_s)
    except DiscoveryError as exc:
        logger.warning("discovery: %s", exc)
        return out
    catalog = models.roles()
    roles = {role: catalog[CATALOG_ROLES[role]] for role in empty if CATALOG_ROLES[role] in catalog}
    found = assign_roles(url, served, roles)
    for role, settings in empty.items():
        filled = fill(settings, found.get(role))
        if role == "EMBED" and filled is not settings:
            query, passage = models.prefixes(CATALOG_ROLES[role])
            filled = filled.model_copy(update={k: v for k, v in (("query_prefix", query), ("passage_prefix", passage))
                                               if v and not getattr(settings, k)})
        if filled is not settings:
            logger.info("discovery: %s endpoint %s model %s", role, filled.base_url, filled.model)
        out[role] = filled
    return out
