"""A small kustomize renderer for the features k8s/ uses (resources, namespace, labels,
images, replicas, JSON 6902 patches with a target), so the manifests are rendered and
checked without kubectl. It refuses any other field rather than ignore it."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "replicas", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def render(directory: Path) -> list[dict]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN
    if unknown:
        raise ValueError(f"{directory}: kustomization fields this renderer does not know: {sorted(unknown)}")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        targets = [d for d in docs if _matches(d, patch["target"])]
        if not targets:
            raise ValueError(f"{directory}: patch target {patch['target']} matches nothing")
        for doc in targets:
            for op in yaml.safe_load(patch["patch"]):
                _apply(doc, op)
    for rule in spec.get("replicas", []):
        hits = [d for d in docs if d["metadata"]["name"] == rule["name"] and "replicas" in d.get("spec", {})]
        if not hits:
            raise ValueError(f"{directory}: replicas for {rule['name']} match nothing")
        for doc in hits:
            doc["spec"]["replicas"] = rule["count"]
    for image in spec.get("images", []):
        for container in _containers(docs):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for labels in spec.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(labels["pairs"])
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    return docs


def _matches(doc: dict, target: dict) -> bool:
    return all(doc["kind"] == v if k == "kind" else doc["metadata"]["name"] == v for k, v in target.items())


def _containers(docs: list[dict]) -> list[dict]:
    return [c for d in docs for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])]


def _apply(doc: dict, op: dict) -> None:
    """One JSON 6902 operation (add, remove, replace) on `doc`, in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list) and last != "-":
        last = int(last)
        if not 0 <= last < len(node) + (op["op"] == "add"):
            raise ValueError(f"{op['path']}: index out of range")
    elif isinstance(node, dict) and op["op"] in ("remove", "replace") and last not in node:
        raise ValueError(f"{op['path']}: nothing there to {op['op']}")
    if op["op"] == "remove":
        del node[last]
    elif op["op"] == "replace":
        node[last] = copy.deepcopy(op["value"])
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else last, copy.deepcopy(op["value"]))
        else:
            node[last] = copy.deepcopy(op["value"])
    else:
        raise ValueError(f"JSON patch op {op['op']!r} is not supported here")
