"""k8s/: every overlay renders, validates against the Kubernetes schemas offline, and says
what the services understand (their real flags and AERIE_* settings, pod names the pools
can reach, GPUs only where they belong)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from tests.kustomize import render

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parent.parent / "k8s"
KUBERNETES_VERSION = "1.30"
OVERLAYS = ["dev", "prod"]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, dict[tuple[str, str], dict]]:
    docs = render(K8S / "overlays" / request.param)
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by_key) == len(docs), "two objects of one kind share a name"
    return request.param, by_key


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def aerie_workloads(objs: dict) -> dict[str, dict]:
    return {name: doc for (kind, name), doc in objs.items()
            if kind in ("Deployment", "StatefulSet") and name in ("aerie-verify", "aerie-draft", "aerie-gateway")}


def test_every_object_is_valid_against_the_schemas(rendered):
    _, objs = rendered
    for doc in objs.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_renderer_rejects_a_patch_that_misses(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap, name: other}\n    patch: '[]'\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match="matches nothing"):
        render(tmp_path)


def test_the_whole_system_is_there(rendered):
    _, objs = rendered
    for name in ("aerie-verify", "aerie-draft", "aerie-gateway"):
        assert ("PodDisruptionBudget", name) in objs
    assert objs["Service", "aerie-verify"]["spec"]["clusterIP"] == "None"
    assert objs["Service", "aerie-draft"]["spec"]["clusterIP"] == "None"
    assert objs["HorizontalPodAutoscaler", "aerie-gateway"]["spec"]["scaleTargetRef"]["name"] == "aerie-gateway"
    assert ("Deployment", "aerie-redis") in objs and ("Deployment", "aerie-otel-collector") in objs
    assert all(doc["metadata"]["namespace"].startswith("aerie") for doc in objs.values())


def test_gpus_only_in_prod_and_only_on_their_pools(rendered):
    overlay, objs = rendered
    work = aerie_workloads(objs)
    for name, doc in work.items():
        spec = pod_spec(doc)
        resources = spec["containers"][0]["resources"]
        gpus = {k: v for part in resources.values() for k, v in part.items() if k == "nvidia.com/gpu"}
        if overlay == "dev" or name == "aerie-gateway":
            assert not gpus and "nodeSelector" not in spec, name
        else:
            # A verify pod holds one rank of its tensor-parallel group per GPU.
            ranks = service_config(spec["containers"][0], objs).tensor_parallel if name == "aerie-verify" else 1
            assert gpus == {"nvidia.com/gpu": str(ranks)}, name
            assert name != "aerie-verify" or ranks == 2, "prod verify pods shard the target over 2 GPUs"
            pool = {"aerie-verify": "large", "aerie-draft": "small"}[name]
            assert spec["nodeSelector"] == {"aerie.dev/gpu-pool": pool}
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_probes_are_native_grpc_on_a_plaintext_port(rendered):
    """kubelet's gRPC probes speak no TLS: they go to the serving port where it is plaintext,
    else to the service's plaintext health-only port, which the container declares. The
    gateway's readiness is its HTTP /health, which also checks Redis and the drafters."""
    _, objs = rendered
    for name, doc in aerie_workloads(objs).items():
        container = pod_spec(doc)["containers"][0]
        config = service_config(container, objs)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["args"][-1] == f"0.0.0.0:{ports['grpc']}", name
        if config.health_listen:
            port = int(config.health_listen.rsplit(":", 1)[1])
            assert ports["health"] == port, name
        else:
            assert config.tls_cert is None, f"{name}: a TLS port without a health-only port cannot be probed"
            port = ports["grpc"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if name == "aerie-gateway" and probe == "readinessProbe":
                http = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
                assert container[probe] == {"httpGet": {"path": "/health", "port": http}, "periodSeconds": 5}
            else:
                assert container[probe]["grpc"] == {"port": port}, (name, probe)


def test_gateway_serves_http_with_the_api_keys_secret(rendered):
    """The HTTP API listens on the port the pod and the Service expose, and the keys file the
    gateway reads is the Secret's item, mounted read-only."""
    _, objs = rendered
    spec = pod_spec(objs["Deployment", "aerie-gateway"])
    container = spec["containers"][0]
    settings = _settings(container, objs)
    http = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert settings["AERIE_HTTP_LISTEN"] == f"0.0.0.0:{http}"
    service_ports = {p["name"]: p for p in objs["Service", "aerie-gateway"]["spec"]["ports"]}
    assert service_ports["http"]["targetPort"] == "http"

    keys_file = Path(settings["AERIE_API_KEYS_FILE"])
    mount = next(m for m in container["volumeMounts"] if keys_file.parent == Path(m["mountPath"]))
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    secret = objs["Secret", volume["secret"]["secretName"]]
    assert keys_file.name in secret["stringData"]
    from gateway.auth import parse_key_items

    assert parse_key_items(secret["stringData"][keys_file.name].splitlines(), keys_file.name)


def test_tls_in_prod_on_every_link(rendered):
    """Dev is plaintext. In prod every pod serves TLS with its own service's Secret, every
    caller trusts the CA of the pool it calls, and drafters and verifiers accept only callers
    with a certificate (which their callers have)."""
    overlay, objs = rendered
    work = aerie_workloads(objs)
    configs = {name: service_config(pod_spec(doc)["containers"][0], objs) for name, doc in work.items()}
    tls_fields = ("tls_cert", "tls_key", "tls_client_ca", "tls_ca", "tls_server_name", "health_listen")
    if overlay == "dev":
        assert all(getattr(c, f, None) is None for c in configs.values() for f in tls_fields)
        return
    user = int(re.search(r"^USER (\d+)$", (K8S / "Dockerfile").read_text(), re.MULTILINE).group(1))
    for name, config in configs.items():
        spec = pod_spec(work[name])
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        files = [getattr(config, f, None) for f in ("tls_cert", "tls_key", "tls_client_ca", "tls_ca")]
        assert config.tls_cert and config.tls_key, name
        for path in filter(None, files):
            secret = volumes[mounts[str(Path(path).parent)]]["secret"]
            assert secret["secretName"] == f"{name}-tls" and Path(path).name in ("tls.crt", "tls.key", "ca.crt")
            # Not world-readable; the image's user reads it through the pod's fsGroup.
            assert secret["defaultMode"] & 0o007 == 0 and secret["defaultMode"] & 0o040, name
            assert spec["securityContext"]["fsGroup"] == user, name
    for caller, callee in (("aerie-draft", "aerie-verify"), ("aerie-gateway", "aerie-draft")):
        assert configs[callee].tls_client_ca, f"{callee} should require client certificates"
        assert configs[caller].tls_ca == configs[callee].tls_client_ca, caller
        assert configs[caller].tls_cert, f"{caller} has no certificate to show {callee}"


CONFIGS = {"verify": "verify_service.config:VerifyConfig", "draft": "draft_service.config:DraftConfig",
           "gateway": "gateway.config:GatewayConfig"}


def service_config(container: dict, objs: dict):
    """The container's args and settings parsed by its service's own config class."""
    import importlib

    from aerie.cli import build_parser
    from aerie_rpc.config import from_args

    module, cls = CONFIGS[container["args"][1]].split(":")
    return from_args(getattr(importlib.import_module(module), cls), build_parser().parse_args(container["args"]),
                     environ=_settings(container, objs))


def _settings(container: dict, objs: dict) -> dict[str, str]:
    """The AERIE_* values a container sees: its ConfigMap, then its own env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(objs["ConfigMap", source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def test_services_accept_their_arguments_and_settings(rendered, monkeypatch):
    """Each container's args and AERIE_* settings parse into the service's own config, so a
    typo in a manifest fails here rather than in a crash-looping pod."""
    from aerie.cli import build_parser
    from aerie_rpc.config import from_args
    from draft_service.config import DraftConfig
    from gateway.config import GatewayConfig
    from verify_service.config import VerifyConfig

    _, objs = rendered
    configs = {"verify": VerifyConfig, "draft": DraftConfig, "gateway": GatewayConfig}
    every_setting = {f"AERIE_{f.name.upper()}" for cls in configs.values() for f in dataclasses.fields(cls)}
    every_setting.add("AERIE_CACHE")  # read by the model loader, not a service flag
    for name, doc in aerie_workloads(objs).items():
        container = pod_spec(doc)["containers"][0]
        settings = _settings(container, objs)
        unknown = {k for k in settings if k.startswith("AERIE_")} - every_setting
        assert not unknown, f"{name}: settings no service reads: {unknown}"
        for key in [k for k in os.environ if k.startswith("AERIE_")]:
            monkeypatch.delenv(key)
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        args = build_parser().parse_args(container["args"])
        assert args.command == "serve"
        service = container["args"][1]
        config = from_args(configs[service], args)
        assert config.listen == container["args"][-1]
        # Each open stream holds a server thread for its whole life: with fewer threads than
        # sessions, the streams past the thread count would wait in a queue.
        if hasattr(config, "max_sessions"):
            assert config.workers >= config.max_sessions, f"{name}: {config.workers} workers for {config.max_sessions} sessions"


def test_pools_list_exactly_the_pods_that_exist(rendered):
    """Drafters and gateways address pods by their StatefulSet names: every pod listed must
    exist, and every pod must be listed (or it would take no work)."""
    _, objs = rendered
    for client, server, key in (("aerie-draft", "aerie-verify", "AERIE_VERIFIER"),
                                ("aerie-gateway", "aerie-draft", "AERIE_DRAFT")):
        container = pod_spec(aerie_workloads(objs)[client])["containers"][0]
        listed = _settings(container, objs)[key].split(",")
        server_doc = objs["StatefulSet", server]
        port = pod_spec(server_doc)["containers"][0]["ports"][0]["containerPort"]
        service = server_doc["spec"]["serviceName"]
        expected = [f"{server}-{i}.{service}:{port}" for i in range(server_doc["spec"]["replicas"])]
        assert listed == expected, client


def test_images_are_the_projects_and_pinned(rendered):
    _, objs = rendered
    for doc in aerie_workloads(objs).values():
        image = pod_spec(doc)["containers"][0]["image"]
        assert image.startswith("ghcr.io/aerie-project/aerie:") and not image.endswith(":latest")
    assert (K8S / "Dockerfile").is_file()
