"""docker/k8s/: what `kubectl apply -k docker/k8s` creates, checked with no cluster.

Three layers (issue 13):
1. The render. `render()` is the part of kustomize that docker/k8s/kustomization.yaml uses
   (resources, namespace, images) and refuses any other feature, so a new one fails here
   rather than being skipped. Where kubectl is installed, its render must be the same.
2. The schemas. Every rendered object, and secret.example.yaml, against the strict OpenAPI
   schemas of the oldest Kubernetes README.md supports (bundled by kubernetes-validate, so
   no cluster and no network): a field that version lacks, a typo or a wrong type fails.
   And against the newest version the package bundles, for fields removed since.
3. What the schemas cannot see and would break at run time: the Job's pod failure policy as
   the API server validates it and as the Job controller matches it, the completion index
   reaching `--index`, Secrets/ConfigMaps/claims and their keys, the image's user and HF_HOME,
   image names, the grace period README.md states, and every kubectl command README.md and
   the manifests' comments give.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from gemma_search.errors import CONFIG_ERROR_EXIT
from tests.test_deploy import _argv, _shell_lines

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
DOCKERFILE = REPO / "docker" / "Dockerfile"
README = REPO / "README.md"

Doc = dict[str, Any]


# --- 1. the render ---------------------------------------------------------------------------

class Unsupported(Exception):
    """kustomization.yaml uses a kustomize feature render() does not implement."""


#: Kinds whose namespace kustomize's `namespace:` sets in metadata and nowhere else. Others
#: (RoleBinding subjects, webhooks, cluster-scoped kinds) need more: refused until needed.
NAMESPACED_KINDS = {"ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "Deployment",
                    "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ServiceAccount"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images"}
IMAGE_KEYS = {"name", "newName", "newTag", "digest"}


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of `registry:5000/name:tag@digest` (the port is not a tag)."""
    name, _, digest = image.partition("@")
    head, colon, tag = name.rpartition(":")
    if colon and "/" not in tag:
        name = head
    else:
        tag = ""
    return name, tag or None, digest or None


def _retag(image: str, entries: list[dict[str, str]]) -> str:
    name, tag, digest = _split_image(image)
    for entry in entries:
        if entry["name"] != name:  # kustomize matches the name exactly, registry included
            continue
        new = entry.get("newName", name)
        if "digest" in entry:
            return f"{new}@{entry['digest']}"
        if "newTag" in entry:  # replaces the tag and any digest
            return f"{new}:{entry['newTag']}"
        return new + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return image


def _containers_anywhere(node: Any) -> Iterator[dict[str, Any]]:
    """Every container and init container, wherever a pod spec sits in the object."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers_anywhere(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers_anywhere(item)


def render(folder: Path) -> list[Doc]:
    """`kubectl kustomize FOLDER` for the features kustomization.yaml uses; Unsupported else."""
    path = folder / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    unknown = sorted(set(kustomization) - KUSTOMIZATION_KEYS)
    if unknown:
        raise Unsupported(f"{path}: {unknown} not implemented in tests/test_k8s.py render() "
                          f"(it does {sorted(KUSTOMIZATION_KEYS)}): implement them there")
    if (kustomization.get("apiVersion", "kustomize.config.k8s.io/v1beta1"),
            kustomization.get("kind", "Kustomization")) != (
            "kustomize.config.k8s.io/v1beta1", "Kustomization"):
        raise Unsupported(f"{path}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    docs: list[Doc] = []
    for entry in kustomization.get("resources") or []:
        resource = folder / entry
        if "://" in entry or not resource.is_file():
            raise Unsupported(f"{path}: resource {entry!r} is not a file beside it (remote "
                              "and directory resources are not implemented)")
        docs += [d for d in yaml.safe_load_all(resource.read_text()) if d is not None]

    namespace = kustomization.get("namespace")
    if namespace is not None:
        for doc in docs:
            if doc["kind"] == "Namespace":
                doc["metadata"]["name"] = namespace  # as kustomize does (checked: v5.5)
            elif doc["kind"] in NAMESPACED_KINDS:
                doc["metadata"]["namespace"] = namespace
            else:
                raise Unsupported(f"namespace: for kind {doc['kind']} is not implemented")

    images = kustomization.get("images") or []
    for entry in images:
        unknown = sorted(set(entry) - IMAGE_KEYS)
        if unknown or "name" not in entry or {"newTag", "digest"} <= set(entry):
            raise Unsupported(f"images: {entry} (implemented: name with newName and one of "
                              "newTag or digest)")
        if not all(isinstance(v, str) for v in entry.values()):
            raise Unsupported(f"images: {entry}: quote every value (newTag: 1.10 is 1.1)")
    for doc in docs:
        for container in _containers_anywhere(doc):
            container["image"] = _retag(container["image"], images)

    ids = Counter((d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
                  for d in docs)
    duplicates = [i for i, n in ids.items() if n > 1]
    if duplicates:
        raise Unsupported(f"{path}: the same object twice: {duplicates}")
    return docs


def _key(doc: Doc) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


@cache
def _rendered() -> tuple[Doc, ...]:
    return tuple(render(K8S))


def _docs() -> list[Doc]:
    return copy.deepcopy(list(_rendered()))


def _one(kind: str, name: str) -> Doc:
    found = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in the render"
    return found[0]


def _pods(docs: list[Doc] | None = None) -> Iterator[tuple[str, Doc, dict[str, Any]]]:
    """(kind/name, pod template, pod spec) of every workload."""
    for doc in _docs() if docs is None else docs:
        if doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
            template = doc["spec"]["template"]
            yield f"{doc['kind']}/{doc['metadata']['name']}", template, template["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_render_does_what_kustomize_does(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "namespace": "foo", "resources": ["a.yaml"],
        "images": [{"name": "img", "newName": "reg:5000/img", "newTag": "1"},
                   {"name": "other", "digest": "sha256:abc"}]}))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bar"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x"},
         "spec": {"initContainers": [{"name": "i", "image": "img:5"}],
                  "containers": [{"name": n, "image": i} for n, i in [
                      ("a", "img"), ("b", "img@sha256:123"), ("c", "docker.io/img:2"),
                      ("d", "other:3"), ("e", "imgx:3"), ("f", "reg:5000/img")]]}}]))
    namespace, pod = render(tmp_path)
    assert namespace["metadata"] == {"name": "foo"}
    assert pod["metadata"]["namespace"] == "foo"
    assert [c["image"] for c in _containers(pod["spec"])] == [
        "reg:5000/img:1", "reg:5000/img:1", "reg:5000/img:1", "docker.io/img:2",
        "other@sha256:abc", "imgx:3", "reg:5000/img"]
    assert _split_image("reg:5000/a/b:1@sha256:x") == ("reg:5000/a/b", "1", "sha256:x")


@pytest.mark.parametrize("extra", [
    {"configMapGenerator": [{"name": "x", "literals": ["a=b"]}]},
    {"patches": [{"path": "p.yaml"}]},
    {"commonLabels": {"a": "b"}},
    {"resources": ["../base"]},
    {"resources": ["https://example.invalid/x.yaml"]},
    {"images": [{"name": "a", "newTag": 1.10}]},
    {"images": [{"name": "a", "newTag": "1", "digest": "sha256:x"}]},
])
def test_render_refuses_what_it_does_not_implement(tmp_path: Path, extra: dict[str, Any]
                                                   ) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["a.yaml"],
                                                                 **extra}))
    with pytest.raises(Unsupported):
        render(tmp_path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_render_is_kubectl_kustomize() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=_key)
    assert theirs == sorted(_docs(), key=_key)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml",
                                                         "secret.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    docs = _docs()
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim",
                                         "Job", "Deployment", "Service"}
    namespace = kustomization["namespace"]
    assert all(d["metadata"].get("namespace") == namespace for d in docs
               if d["kind"] != "Namespace")


# --- 2. the schemas --------------------------------------------------------------------------

def _readme_k8s() -> str:
    text = README.read_text()
    section = re.search(r"^## Launch on Kubernetes\n(.*?)^## ", text, re.M | re.S)
    assert section, "README.md has no '## Launch on Kubernetes' section"
    return section[1]


def _oldest_supported() -> str:
    found = re.search(r"Kubernetes (?:≥|>=) ?(\d+\.\d+)", _readme_k8s())
    assert found, "README.md's Kubernetes section names no minimum version (Kubernetes ≥ X.Y)"
    return found[1]


def _schema_errors(docs: list[Doc], version: str) -> list[str]:
    import kubernetes_validate

    errors = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: .{'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:  # an unknown kind fails too
            errors.append(f"{where}: {e.message}")
    return errors


def _secret_example() -> list[Doc]:
    return [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]


def test_manifests_match_the_schemas_of_the_oldest_and_newest_kubernetes() -> None:
    from kubernetes_validate.utils import all_versions, latest_version

    oldest = _oldest_supported()
    bundled = sorted(set(all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    # The package falls back to an older schema when a version is missing: refuse that.
    assert f"{oldest}.0" in bundled, (
        f"kubernetes-validate bundles {bundled}, not README.md's Kubernetes {oldest}: "
        "pin a kubernetes-validate that does in pyproject.toml")
    docs = _docs() + _secret_example()
    for version in (f"{oldest}.0", latest_version()):
        errors = _schema_errors(docs, version)
        assert not errors, f"Kubernetes {version}:\n" + "\n".join(errors)


def test_schema_check_catches_fields_the_version_lacks() -> None:
    job = _one("Job", "gemma-search-workers")
    job["spec"]["successPolicy"] = {"rules": [{"succeededCount": 1}]}  # Kubernetes 1.30
    assert _schema_errors([job], "1.29.0") and not _schema_errors([job], "1.33.0")
    job = _one("Job", "gemma-search-workers")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert _schema_errors([job], "1.29.0")
    job = _one("Job", "gemma-search-workers")
    job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "300"
    assert _schema_errors([job], "1.29.0")


# --- 3. what would break at run time ---------------------------------------------------------

# The API server's own checks of a Job, for the fields our Jobs use: the schemas hold no
# enums and no rule that spans two fields.
POD_FAILURE_ACTIONS = {"Count", "FailIndex", "FailJob", "Ignore"}
CONDITION_STATUSES = {"True", "False", "Unknown"}


def job_spec_errors(spec: dict[str, Any]) -> list[str]:
    """Why the API server would refuse this Job spec (the rules for the fields we use)."""
    errors = []
    pod = spec["template"]["spec"]
    indexed = spec.get("completionMode", "NonIndexed") == "Indexed"
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        errors.append(f"restartPolicy {pod.get('restartPolicy')!r}: Never or OnFailure")
    if indexed and "completions" not in spec:
        errors.append("completions: required when completionMode is Indexed")
    for field in ("backoffLimitPerIndex", "maxFailedIndexes"):
        if field in spec and not indexed:
            errors.append(f"{field}: requires completionMode Indexed")
    if "maxFailedIndexes" in spec and "backoffLimitPerIndex" not in spec:
        errors.append("maxFailedIndexes: requires backoffLimitPerIndex")
    policy = spec.get("podFailurePolicy")
    replacement = spec.get("podReplacementPolicy")
    if replacement not in (None, "Failed", "TerminatingOrFailed"):
        errors.append(f"podReplacementPolicy {replacement!r}: Failed or TerminatingOrFailed")
    if policy is None:
        return errors
    if pod.get("restartPolicy") != "Never":
        errors.append("restartPolicy: only Never is supported when podFailurePolicy is set")
    if replacement not in (None, "Failed"):
        errors.append("podReplacementPolicy: must be Failed when podFailurePolicy is set")
    names = {c["name"] for c in _containers(pod)}
    rules = policy.get("rules", [])
    if len(rules) > 20:
        errors.append(f"podFailurePolicy: {len(rules)} rules, at most 20")
    for i, rule in enumerate(rules):
        at = f"podFailurePolicy.rules[{i}]"
        action = rule.get("action")
        if action not in POD_FAILURE_ACTIONS:
            errors.append(f"{at}.action {action!r}: one of {sorted(POD_FAILURE_ACTIONS)}")
        if action == "FailIndex" and "backoffLimitPerIndex" not in spec:
            errors.append(f"{at}.action FailIndex: requires backoffLimitPerIndex")
        on_codes, on_conditions = rule.get("onExitCodes"), rule.get("onPodConditions")
        if (on_codes is None) == (not on_conditions):
            errors.append(f"{at}: exactly one of onExitCodes and onPodConditions")
        if on_codes is not None:
            values = on_codes.get("values", [])
            if on_codes.get("operator") not in ("In", "NotIn"):
                errors.append(f"{at}.onExitCodes.operator {on_codes.get('operator')!r}")
            if "containerName" in on_codes and on_codes["containerName"] not in names:
                errors.append(f"{at}.onExitCodes.containerName {on_codes['containerName']!r}:"
                              f" not a container of the pod ({sorted(names)})")
            if not 1 <= len(values) <= 255:
                errors.append(f"{at}.onExitCodes.values: 1 to 255 values")
            if on_codes.get("operator") == "In" and 0 in values:
                errors.append(f"{at}.onExitCodes.values: 0 is not allowed with In")
            if values != sorted(set(values)):
                errors.append(f"{at}.onExitCodes.values {values}: must be ordered, unique")
        for pattern in on_conditions or []:
            if pattern.get("status") not in CONDITION_STATUSES:
                errors.append(f"{at}.onPodConditions status {pattern.get('status')!r}")
            if not pattern.get("type"):
                errors.append(f"{at}.onPodConditions: type is required")
    return errors


def exit_code_action(spec: dict[str, Any], container: str, code: int) -> str:
    """What the Job controller does when CONTAINER exits CODE: the first matching rule's
    action (rules are evaluated in order), or Count when none matches."""
    for rule in spec.get("podFailurePolicy", {}).get("rules", []):
        on_codes = rule.get("onExitCodes")
        if on_codes is None or on_codes.get("containerName", container) != container:
            continue
        if (code in on_codes["values"]) == (on_codes["operator"] == "In"):
            return str(rule["action"])
    return "Count"


def test_job_check_catches_what_the_api_server_refuses() -> None:
    base = _one("Job", "gemma-search-workers")["spec"]
    at = next(i for i, r in enumerate(base["podFailurePolicy"]["rules"]) if "onExitCodes" in r)

    def refused(change: Callable[[dict[str, Any], dict[str, Any]], object]) -> list[str]:
        """job_spec_errors after CHANGE(spec, the first onExitCodes rule of spec)."""
        spec = copy.deepcopy(base)
        change(spec, spec["podFailurePolicy"]["rules"][at])
        return job_spec_errors(spec)

    assert refused(lambda s, r: s["template"]["spec"].update(restartPolicy="OnFailure"))
    assert refused(lambda s, r: s.update(podReplacementPolicy="TerminatingOrFailed"))
    assert refused(lambda s, r: s.update(completionMode="NonIndexed"))  # backoffLimitPerIndex
    assert refused(lambda s, r: r.update(action="Fail"))
    assert refused(lambda s, r: r.update(onPodConditions=[{"type": "DisruptionTarget",
                                                           "status": "True"}]))
    for codes in ({"values": [0, 3]}, {"values": [143, 3]}, {"values": [3, 3]},
                  {"containerName": "wroker"}, {"operator": "Equals"}):
        spec = copy.deepcopy(base)
        spec["podFailurePolicy"]["rules"][at]["onExitCodes"].update(codes)
        assert job_spec_errors(spec), codes
    # rules are matched in order: an earlier NotIn [143] would swallow exit code 3
    spec = copy.deepcopy(base)
    spec["podFailurePolicy"]["rules"].insert(0, {"action": "Ignore", "onExitCodes": {
        "containerName": "worker", "operator": "NotIn", "values": [143]}})
    assert exit_code_action(spec, "worker", CONFIG_ERROR_EXIT) == "Ignore"


def test_every_job_is_one_the_api_server_accepts() -> None:
    jobs = [d for d in _docs() if d["kind"] == "Job"]
    assert len(jobs) == 2
    for job in jobs:
        errors = job_spec_errors(job["spec"])
        assert not errors, f"Job/{job['metadata']['name']}: {errors}"


def test_workers_fail_the_job_on_a_config_error_and_retry_a_stop() -> None:
    spec = _one("Job", "gemma-search-workers")["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    # a configuration error (the worker exits 3) is the same for every index: fail the Job
    assert exit_code_action(spec, "worker", CONFIG_ERROR_EXIT) == "FailJob"
    # told to stop (the wrapper exits 143 after the checkpoint): a new pod, not a failure
    assert exit_code_action(spec, "worker", 143) == "Ignore"
    assert {"type": "DisruptionTarget", "status": "True"} in [
        c for r in spec["podFailurePolicy"]["rules"] if r["action"] == "Ignore"
        for c in r.get("onPodConditions", [])]
    # a crash or an OOM kill: counted against that index's backoffLimitPerIndex
    for code in (1, 137):
        assert exit_code_action(spec, "worker", code) == "Count", code
    assert spec["backoffLimitPerIndex"] >= 1


def _index_source(container: dict[str, Any]) -> str:
    """The variable the worker's `--index` reads, from its shell script or its args."""
    words = (shlex.split(container["command"][2].split("gemma-search ", 1)[1])
             if container.get("command", [])[:2] == ["sh", "-c"] else container["args"])
    assert "worker" in words and "--index" in words, words
    value = words[words.index("--index") + 1]
    found = re.fullmatch(r"\$(?:\{(\w+)\}|\((\w+)\)|(\w+))", value)
    assert found, f"--index {value!r} is not a variable"
    return next(g for g in found.groups() if g)


def test_completion_index_reaches_index() -> None:
    job = _one("Job", "gemma-search-workers")["spec"]
    assert job["completionMode"] == "Indexed"  # the controller sets the index in every pod
    assert job["parallelism"] == job["completions"] >= 1
    pod = job["template"]["spec"]
    (worker,) = [c for c in pod["containers"] if c["name"] == "worker"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    variable = _index_source(worker)
    env = {e["name"]: e for e in worker.get("env", [])}
    annotation = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    if variable in env:  # set by hand: only the downward API's annotation will do
        assert env[variable].get("valueFrom", {}).get("fieldRef", {}).get(
            "fieldPath") == annotation, env[variable]
    else:  # the Job controller sets JOB_COMPLETION_INDEX in an Indexed Job's containers
        assert variable == "JOB_COMPLETION_INDEX", variable


def test_grace_period_is_the_one_readme_states() -> None:
    stated = re.search(r"`terminationGracePeriodSeconds` \((\d+) s\)", _readme_k8s())
    assert stated, "README.md's Kubernetes section no longer states the grace period"
    pod = _one("Job", "gemma-search-workers")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == int(stated[1])


def _dockerfile_user() -> tuple[str, int, int]:
    """(name, uid, gid) of the user the image runs as, from docker/Dockerfile."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    command = re.search(r"\buseradd\s([^&;\n]*)", text)
    assert command, "docker/Dockerfile creates no user (useradd)"
    words = [w for word in shlex.split(command[1]) for w in word.split("=", 1)]  # --uid=N
    options = dict(zip(words, [*words[1:], ""], strict=True))
    uid = options.get("--uid") or options.get("-u")
    assert uid and uid.isdigit(), "useradd needs a fixed --uid for runAsUser"
    group = options.get("--gid") or options.get("-g")
    if group is None:
        # --user-group with no --gid: useradd gives the new group the uid's number when that
        # gid is free, as it is in a fresh base image.
        assert {"--user-group", "-U"} & set(words), "useradd without --gid or --user-group"
        gid = int(uid)
    elif group.isdigit():
        gid = int(group)
    else:
        made = re.search(rf"\bgroupadd\s[^&;\n]*(?:--gid|-g)\s+(\d+)[^&;\n]*\s{group}\b", text)
        assert made, f"useradd --gid {group}: no groupadd --gid N {group}"
        gid = int(made[1])
    name = words[-1]
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user, "docker/Dockerfile has no USER: the image would run as root"
    assert user[-1].split(":")[0] in (name, uid), f"USER {user[-1]} is not {name} ({uid})"
    return name, int(uid), gid


def test_pods_run_as_the_images_user() -> None:
    _, uid, gid = _dockerfile_user()
    for where, _, pod in _pods():
        context = pod["securityContext"]
        # The image's USER is a name: runAsNonRoot alone would not start (the kubelet
        # cannot prove a name is not root), so runAsUser must be the number.
        assert context["runAsNonRoot"] is True, where
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (
            uid, gid, gid), f"{where}: not the image's {uid}:{gid} (docker/Dockerfile)"
        for c in _containers(pod):
            own = c.get("securityContext", {})
            assert own.get("runAsUser", uid) == uid and own.get("runAsGroup", gid) == gid, (
                f"{where}:{c['name']}")
            assert own.get("allowPrivilegeEscalation") is False, f"{where}:{c['name']}"


def test_every_image_is_the_one_kustomization_sets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (entry,) = kustomization["images"]
    raw = [c for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
           for d in yaml.safe_load_all(path.read_text()) if d for c in _containers_anywhere(d)]
    assert raw and {_split_image(c["image"])[0] for c in raw} == {entry["name"]}
    pushed = re.findall(r"docker push (\S+)", _readme_k8s())
    expected = f"{entry['newName']}:{entry['newTag']}"
    assert pushed == [expected], f"README.md pushes {pushed}; kustomization.yaml sets {expected}"
    for where, _, pod in _pods():
        assert {c["image"] for c in _containers(pod)} == {expected}, where


def _mounts(container: dict[str, Any], volumes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def _volume_at(path: str, mounts: dict[str, dict[str, Any]]
               ) -> tuple[str, dict[str, Any]] | tuple[None, None]:
    """(mountPath, volume) that PATH lies on, the deepest mount first."""
    for mount, volume in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return mount, volume
    return None, None


def _create_secret_commands(text: str) -> list[list[str]]:
    """argv after `create secret generic` of every kubectl command in TEXT (or its comments)."""
    return [_argv(found[1]) for line in _shell_lines(text)
            if (found := re.search(r"kubectl\b.*\bcreate secret generic\s+(.*)",
                                   re.sub(r"^\s*#\s*", "", line)))]


def _readme_secrets(text: str) -> dict[str, set[str]]:
    """{secret: keys} of every `kubectl create secret generic NAME --from-file=KEY=PATH`."""
    secrets: dict[str, set[str]] = {}
    for words in _create_secret_commands(text):
        keys = set()
        for word in words[1:]:
            assert not word.startswith("--from-literal"), (
                f"{word}: a secret on the command line shows in shell history; --from-file")
            if word.startswith("--from-file="):
                source = word.split("=", 1)[1]
                keys.add(source.split("=", 1)[0] if "=" in source else Path(source).name)
        secrets[words[0]] = keys
    return secrets


def test_secrets_are_the_ones_readme_creates_with_the_keys_pods_read() -> None:
    created = _readme_secrets(_readme_k8s())
    assert created, "README.md's Kubernetes section creates no Secret"
    # secret.example.yaml shows the same commands (a path included) and the same objects
    assert _create_secret_commands((K8S / "secret.example.yaml").read_text()) == (
        _create_secret_commands(_readme_k8s()))
    assert {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
            for d in _secret_example()} == created
    used = set()
    for where, _, pod in _pods():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in created, f"{where}: Secret {name} is not one README creates"
                items = volume["secret"].get("items", [])
                assert {i["key"] for i in items} <= created[name], where
                used.add(name)
        for c in _containers(pod):
            mounts = _mounts(c, volumes)
            env = {e["name"]: e for e in c.get("env", [])}
            assert "GEMMA_SEARCH_STORAGE" not in env, f"{where}: the URL as plain env"
            for e in env.values():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in created.get(ref["name"], set()), (where, ref)
                value = e.get("value", "")
                mount, volume = _volume_at(value, mounts)
                if mount is None or volume is None or "secret" not in volume:
                    continue  # not a file in a Secret
                secret = volume["secret"]
                files = ({i["path"]: i["key"] for i in secret["items"]} if "items" in secret
                         else {k: k for k in created[secret["secretName"]]})
                relative = value[len(mount):].lstrip("/")
                assert relative in files, (f"{where}:{c['name']}: {e['name']}={value}, but "
                                           f"Secret {secret['secretName']} holds {sorted(files)}")
            # every pod that talks to the database reads the URL from the storage Secret
            _, volume = _volume_at(env["GEMMA_SEARCH_STORAGE_FILE"]["value"], mounts)
            assert volume and volume["secret"]["secretName"] == "gemma-search-storage", (
                f"{where}:{c['name']}")
    assert used == set(created), f"created but never mounted: {set(created) - used}"


def test_config_map_keys_and_claims_exist() -> None:
    docs = _docs()
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs
                   if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    used_claims = set()
    for where, _, pod in _pods(docs):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                name = volume["persistentVolumeClaim"]["claimName"]
                assert name in claims, f"{where}: no PersistentVolumeClaim {name}"
                # pods on several nodes mount it at once
                assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"], name
                used_claims.add(name)
            if "configMap" in volume:
                data = config_maps[volume["configMap"]["name"]]
                assert {i["key"] for i in volume["configMap"].get("items", [])} <= set(data)
        for c in _containers(pod):
            assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes), where
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, where
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in config_maps.get(ref["name"], {}), (
                        f"{where}:{c['name']}: {e['name']} reads ConfigMap {ref['name']} key "
                        f"{ref['key']}, which does not exist")
    assert used_claims == set(claims)


def test_args_expand_only_variables_the_container_defines() -> None:
    """`$(VAR)` in command/args is replaced only by the container's own env; any other is
    passed on literally (`dashboard $(STUDY)` would open a study named '$(STUDY)')."""
    for where, _, pod in _pods():
        for c in _containers(pod):
            defined = {e["name"] for e in c.get("env", [])} | {"JOB_COMPLETION_INDEX"}
            used = set(re.findall(r"(?<!\$)\$\((\w+)\)", " ".join(
                [*c.get("command", []), *c.get("args", [])])))
            assert used <= defined, f"{where}:{c['name']}: {sorted(used - defined)}"


def _readme_creates() -> list[list[str]]:
    """The argv after `gemma-search create` of each create README.md's section runs."""
    return [_argv(found[1]) for line in _shell_lines(_readme_k8s())
            if (found := re.search(r"(?:^\s*|\s--\s+)gemma-search\s+create\s+(.*)", line))]


def test_hf_home_and_study_paths_are_on_the_shared_claims() -> None:
    """The model downloads once (HF_HOME on the models claim), and the paths `create`
    checked in the toolbox are the paths every worker reads, on the same claims."""
    hf_home = re.search(r"\bHF_HOME=(\S+)", DOCKERFILE.read_text())
    assert hf_home, "docker/Dockerfile no longer sets HF_HOME"
    (create,) = _readme_creates()
    paths = [w.split("=", 1)[1] for w in create if re.match(r"[\w.]+=/", w)]
    assert any("checkpoints" in p for p in paths), create
    toolbox = _one("Deployment", "gemma-search-toolbox")["spec"]["template"]["spec"]
    workers = _one("Job", "gemma-search-workers")["spec"]["template"]["spec"]
    placed = {}
    for name, pod in (("toolbox", toolbox), ("worker", workers)):
        (container,) = pod["containers"]
        assert "HF_HOME" not in {e["name"] for e in container.get("env", [])}
        mounts = _mounts(container, {v["name"]: v for v in pod["volumes"]})
        placed[name] = {path: _volume_at(path, mounts) for path in [hf_home[1], *paths]}
        lost = [p for p, (_, v) in placed[name].items() if not v or
                "persistentVolumeClaim" not in v]
        assert not lost, f"{name}: {lost} on no claim, so gone with the pod"
        _, models = placed[name][hf_home[1]]
        claim = models["persistentVolumeClaim"]["claimName"] if models else None
        assert claim == "gemma-search-models", (name, claim)
    assert placed["toolbox"] == placed["worker"]


def test_study_in_the_config_map_is_the_one_readme_creates() -> None:
    from gemma_search.spec import shipped_studies

    study = _one("ConfigMap", "gemma-search")["data"]["STUDY"]
    ((created, *_),) = _readme_creates()
    spec = yaml.safe_load(shipped_studies()[created].read_text())
    assert spec["name"] == study, f"README creates {spec['name']}; the pods wait for {study}"


def test_workload_selectors_match_their_pods() -> None:
    docs = _docs()
    templates = [(where, template) for where, template, _ in _pods(docs)]
    for doc in docs:
        if doc["kind"] == "Deployment":  # the API server refuses a selector its pods lack
            labels = doc["spec"]["selector"]["matchLabels"]
            template_labels = doc["spec"]["template"]["metadata"]["labels"]
            assert labels.items() <= template_labels.items(), doc["metadata"]["name"]
        if doc["kind"] == "Service":  # no endpoints, silently, when it selects no pod
            labels = doc["spec"]["selector"]
            chosen = [t for _, t in templates if labels.items() <= t["metadata"]["labels"].items()]
            assert len(chosen) == 1, f"Service {doc['metadata']['name']} selects {len(chosen)}"
            ports = {p.get("name"): p["containerPort"] for c in chosen[0]["spec"]["containers"]
                     for p in c.get("ports", [])}
            for port in doc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in ports or target in ports.values(), (doc["metadata"], target)


def test_dashboard_is_cluster_internal() -> None:
    service = _one("Service", "gemma-search-dashboard")["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    deployment = _one("Deployment", "gemma-search-dashboard")
    (dashboard,) = deployment["spec"]["template"]["spec"]["containers"]
    assert dashboard["args"][0] == "dashboard"
    assert dashboard["args"][dashboard["args"].index("--port") + 1] == str(
        dashboard["ports"][0]["containerPort"])


KIND_WORDS = {"deploy": "Deployment", "deployment": "Deployment", "job": "Job",
              "svc": "Service", "service": "Service", "secret": "Secret",
              "cm": "ConfigMap", "configmap": "ConfigMap", "pvc": "PersistentVolumeClaim"}


def _kubectl_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every kubectl command README.md's section and the comments give."""
    sources = [("README.md", "\n".join(re.findall(r"```[^\n]*\n(.*?)```", _readme_k8s(),
                                                   re.S)))]
    # comment lines indented as examples: `#   kubectl ...`, not prose
    sources += [(p.name, "\n".join(re.findall(r"^#\s{2,}(.*)$", p.read_text(), re.M)))
                for p in sorted(K8S.glob("*.yaml"))]
    for where, text in sources:
        for line in _shell_lines(text):
            for found in re.finditer(r"\bkubectl\s+(.*)", line):
                yield where, _argv(found[1])


def test_kubectl_commands_name_objects_that_exist() -> None:
    docs = _docs()
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    objects = {(d["kind"], d["metadata"]["name"]) for d in docs}
    objects |= {("Secret", n) for n in _readme_secrets(_readme_k8s())}
    pod_labels = [t["metadata"]["labels"] for _, t, _ in _pods(docs)]
    commands = list(_kubectl_commands())
    assert len(commands) >= 10, commands
    problems = []
    for where, argv in commands:
        said = f"{where}: kubectl {' '.join(argv)}"
        if "-n" in argv and argv[argv.index("-n") + 1] != namespace:
            problems.append(f"{said}: namespace is {namespace}")
        if argv[:2] == ["create", "namespace"] and argv[2] != namespace:
            problems.append(f"{said}: namespace is {namespace}")
        refs = [w.split("/", 1) for w in argv if re.fullmatch(r"[a-z]+/[\w.-]+", w)
                and w.split("/")[0] in KIND_WORDS]
        for verb in ("patch", "delete", "describe", "scale"):
            if verb in argv and argv.index(verb) + 2 < len(argv):
                kind, name = argv[argv.index(verb) + 1: argv.index(verb) + 3]
                if kind in KIND_WORDS:
                    refs.append([kind, name])
        for kind, name in refs:
            if (KIND_WORDS[kind], name) not in objects:
                problems.append(f"{said}: no {KIND_WORDS[kind]} {name}")
        if "-l" in argv:
            wanted = dict(p.split("=", 1) for p in argv[argv.index("-l") + 1].split(","))
            if not any(wanted.items() <= labels.items() for labels in pod_labels):
                problems.append(f"{said}: no pod has labels {wanted}")
        if "-k" in argv and not (REPO / argv[argv.index("-k") + 1]).is_dir():
            problems.append(f"{said}: no such folder")
        if "patch" in argv and "-p" in argv:  # elastic Indexed Job: both or refused
            body = json.loads(argv[argv.index("-p") + 1]).get("spec", {})
            if "completions" in body and body["completions"] != body.get("parallelism"):
                problems.append(f"{said}: completions can only change with parallelism")
        if "port-forward" in argv:
            target = argv[argv.index("port-forward") + 1]
            port = int(argv[argv.index(target) + 1].split(":")[-1])
            ports = [p["port"] for d in docs if f"svc/{d['metadata']['name']}" == target
                     and d["kind"] == "Service" for p in d["spec"]["ports"]]
            if port not in ports:
                problems.append(f"{said}: {target} has no port {port}")
    assert not problems, "\n".join(problems)
