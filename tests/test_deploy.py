"""The Kubernetes manifests in deploy/ agree with what the gateway serves and reads.

Every kustomization under deploy/ (the base and each overlay) is rendered with the real
kustomize (``kubectl kustomize``, as ``kubectl apply -k`` renders it), and every object is
validated against the Kubernetes OpenAPI schemas shipped in ``kubernetes-validate`` (strict:
unknown fields fail), for the oldest Kubernetes the manifests claim (1.30: the native
``preStop.sleep`` action) and the newest the package knows. cert-manager's ``Certificate`` has
no schema there; it is checked against a structural schema of the fields used, below.

Then the rendered objects are held to the gateway itself: the ConfigMap's gateway.yaml loads
with ``load_config_text`` once the Secret and ConfigMap are laid out at their mount paths
(with throwaway certificates from ``mtls_gateway.pki``), container ports, Service, probes,
metrics annotations and NetworkPolicy match its ``listen``/``admin`` ports and
``mtls_gateway.admin`` paths, the upstream is the app container on loopback, and the pod
outlives the gateway's drain.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gwtest import Pki
from mtls_gateway.admin import LIVENESS_PATH, METRICS_PATH, READINESS_PATH
from mtls_gateway.config import GatewayConfig
from mtls_gateway.config_load import load_config_text, parse_duration

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
GATEWAY_IMAGE = f"ghcr.io/example/mtls-gateway:{PROJECT['version']}"
#: The oldest Kubernetes the manifests target (lifecycle.preStop.sleep is on by default from
#: 1.30) and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
TARGETS = sorted(
    str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")
    if yaml.safe_load(p.read_text()).get("kind") == "Kustomization")
SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}

Obj = dict[str, Any]


# --- rendering ------------------------------------------------------------------------------

def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        message = ("kubectl is not installed: the manifests are rendered with "
                   "`kubectl kustomize` (Debian/apt package kubectl)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@functools.cache
def _render_text(target: str) -> str:
    result = subprocess.run([_kubectl(), "kustomize", str(DEPLOY / target)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(target: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(_render_text(target)) if d]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(target: str) -> list[Obj]:
    return render(target)


def one(objs: list[Obj], kind: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def gateway_container(objs: list[Obj]) -> Obj:
    found: list[Obj] = [c for c in pod_spec(objs)["containers"]
                        if c["image"].startswith("ghcr.io/example/mtls-gateway:")]
    assert len(found) == 1, "expected one mtls-gateway container"
    return found[0]


def app_containers(objs: list[Obj]) -> list[Obj]:
    gateway = gateway_container(objs)
    return [c for c in pod_spec(objs)["containers"] if c is not gateway]


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def volume(objs: list[Obj], name: str) -> Obj:
    (found,) = [v for v in pod_spec(objs)["volumes"] if v["name"] == name]
    return found  # type: ignore[no-any-return]


def port_number(container: Obj, port: int | str) -> int:
    """A numeric port, or a named one resolved against the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def config_text(objs: list[Obj]) -> tuple[str, str]:
    """(the gateway.yaml text the gateway will read, its path), from the rendered ConfigMap."""
    path = env_of(gateway_container(objs))["MTLS_GATEWAY_CONFIG"]
    folder, name = os.path.split(path)
    (mount,) = [m for m in gateway_container(objs)["volumeMounts"] if m["mountPath"] == folder]
    ref = volume(objs, mount["name"])["configMap"]["name"]
    (configmap,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref]
    assert name in configmap["data"], f"{path}: the ConfigMap {ref} has no key {name}"
    return configmap["data"][name], path


def raw_config(target: str) -> Obj:
    """The gateway.yaml as YAML data (before the gateway applies its defaults)."""
    return yaml.safe_load(config_text(render(target))[0])  # type: ignore[no-any-return]


# --- laying the pod's files out for the gateway -----------------------------------------------

def _file_fields(node: object, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key).endswith("_file") and isinstance(value, str) and value:
                yield where, value
            yield from _file_fields(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _file_fields(item, f"{path}[{i}]")


def load_in_pod_layout(objs: list[Obj], root: Path, pki: Pki) -> GatewayConfig:
    """Write the ConfigMap and Secret files where the gateway container mounts them (under
    ``root``), point the config's paths there, and load it as the gateway would."""
    secret_content = {"tls.crt": pki.server_cert, "tls.key": pki.server_key,
                      "ca.crt": pki.ca_file}
    mounts: list[str] = []
    for mount in gateway_container(objs)["volumeMounts"]:
        vol = volume(objs, mount["name"])
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        mounts.append(mount["mountPath"])
        if "configMap" in vol:
            (cm,) = [o for o in objs if o["kind"] == "ConfigMap"
                     and o["metadata"]["name"] == vol["configMap"]["name"]]
            for key, value in cm["data"].items():
                (target / key).write_text(value)
        elif "secret" in vol:
            for item in vol["secret"]["items"]:
                shutil.copyfile(secret_content[item["key"]], target / item["path"])
    text, path = config_text(objs)
    data = yaml.safe_load(text)
    for where, value in _file_fields(data):
        assert any(value.startswith(m.rstrip("/") + "/") for m in mounts), \
            f"{where}: {value} is not in any volume mounted into the gateway container"

    def relocate(node: object) -> object:
        if isinstance(node, dict):
            return {k: relocate(v) for k, v in node.items()}
        if isinstance(node, list):
            return [relocate(v) for v in node]
        if isinstance(node, str) and any(node.startswith(m.rstrip("/") + "/") for m in mounts):
            return str(root / node.lstrip("/"))
        return node

    return load_config_text(yaml.safe_dump(relocate(data)),
                            base_dir=root / os.path.dirname(path).lstrip("/"))


@pytest.fixture
def config(objects: list[Obj], tmp_path: Path, pki: Pki) -> GatewayConfig:
    return load_in_pod_layout(objects, tmp_path, pki)


# --- schemas ----------------------------------------------------------------------------------

#: cert-manager.io/v1 Certificate: the spec fields cert-manager defines (unknown ones fail),
#: with the types and enums of those this repository uses.
_STR_LIST = {"type": "array", "items": {"type": "string"}}
CERTIFICATE_SCHEMA: Obj = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "issuerRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                   "group": {"type": "string"}}},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": _STR_LIST, "ipAddresses": _STR_LIST, "uris": _STR_LIST,
                "emailAddresses": _STR_LIST,
                "duration": {"type": "string", "pattern": r"^(\d+(\.\d+)?(h|m|s|ms))+$"},
                "renewBefore": {"type": "string", "pattern": r"^(\d+(\.\d+)?(h|m|s|ms))+$"},
                "renewBeforePercentage": {"type": "integer"},
                "privateKey": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "size": {"type": "integer"}}},
                "usages": {"type": "array", "items": {"enum": [
                    "signing", "digital signature", "content commitment", "key encipherment",
                    "key agreement", "data encipherment", "cert sign", "crl sign",
                    "encipher only", "decipher only", "any", "server auth", "client auth",
                    "code signing", "email protection", "s/mime", "ipsec end system",
                    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
                    "microsoft sgc", "netscape sgc"]}},
                "isCA": {"type": "boolean"}, "subject": {"type": "object"},
                "literalSubject": {"type": "string"}, "secretTemplate": {"type": "object"},
                "keystores": {"type": "object"}, "revisionHistoryLimit": {"type": "integer"},
                "encodeUsagesInRequest": {"type": "boolean"},
                "additionalOutputFormats": {"type": "array"},
                "nameConstraints": {"type": "object"}, "otherNames": {"type": "array"},
                "signatureAlgorithm": {"type": "string"},
            },
        },
    },
}
#: Kinds kubernetes-validate has no schema for, each with the schema used instead.
CUSTOM_SCHEMAS = {("cert-manager.io/v1", "Certificate"): CERTIFICATE_SCHEMA}


def test_every_kustomization_is_tested() -> None:
    assert {"base", "overlays/example-payments"} <= set(TARGETS), TARGETS


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_objects_validate_against_the_kubernetes_schemas(target: str, version: str) -> None:
    for obj in render(target):
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_SCHEMAS:
            jsonschema.validate(obj, CUSTOM_SCHEMAS[obj["apiVersion"], obj["kind"]])
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{target}: {obj['kind']}/{obj['metadata']['name']} at {path}: "
                        f"{exc.message}")


@pytest.mark.parametrize(("mutate", "kind"), [
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),
     "Deployment"),
    (lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="40"),
     "Deployment"),
    (lambda c: c["spec"].update(secretname="x"), "Certificate"),
    (lambda c: c["spec"]["privateKey"].update(rotationPolicy="Sometimes"), "Certificate"),
])
def test_the_validation_catches_mistakes(mutate: Any, kind: str) -> None:
    obj = copy.deepcopy(one(render("overlays/example-payments"), kind))
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError):
        if kind == "Certificate":
            jsonschema.validate(obj, CERTIFICATE_SCHEMA)
        else:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


# --- the gateway's view -----------------------------------------------------------------------

def test_gateway_config_loads_with_the_files_the_pod_mounts(config: GatewayConfig) -> None:
    assert config.routes, "no routes"
    public = [r for r in config.routes if type(r.auth).__name__ == "AuthNone"]
    assert [r.match.value for r in public] == ["/health"], \
        "exactly one explicit auth: none route, the health check"
    assert config.listen.client_cert == "required"


def test_ports_probes_metrics_and_service_match_the_gateway(objects: list[Obj],
                                                            config: GatewayConfig) -> None:
    gw = gateway_container(objects)
    template = one(objects, "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    (svc_port,) = one(objects, "Service")["spec"]["ports"]
    table = [
        ("container port https", port_number(gw, "https"), config.listen.port),
        ("container port admin", port_number(gw, "admin"), config.admin.port),
        ("container ports", sorted(p["containerPort"] for p in gw["ports"]),
         sorted([config.listen.port, config.admin.port])),
        ("liveness probe path", gw["livenessProbe"]["httpGet"]["path"], LIVENESS_PATH),
        ("liveness probe port", port_number(gw, gw["livenessProbe"]["httpGet"]["port"]),
         config.admin.port),
        ("liveness probe scheme", gw["livenessProbe"]["httpGet"].get("scheme", "HTTP"), "HTTP"),
        ("readiness probe path", gw["readinessProbe"]["httpGet"]["path"], READINESS_PATH),
        ("readiness probe port", port_number(gw, gw["readinessProbe"]["httpGet"]["port"]),
         config.admin.port),
        ("prometheus.io/port", annotations["prometheus.io/port"], str(config.admin.port)),
        ("prometheus.io/path", annotations["prometheus.io/path"], METRICS_PATH),
        ("Service targetPort", port_number(gw, svc_port["targetPort"]), config.listen.port),
        ("admin enabled", config.admin.enabled, True),
    ]
    wrong = [f"{what}: {got!r} != {want!r}" for what, got, want in table if got != want]
    assert not wrong, "\n".join(wrong)


def test_probes_and_clients_can_reach_the_listeners(config: GatewayConfig) -> None:
    """kubelet probes, Prometheus and the Service connect to the pod IP, not loopback."""
    for what, host in (("listen.host", config.listen.host), ("admin.host", config.admin.host)):
        assert host in ("0.0.0.0", "::"), f"{what} {host} is not reachable from outside the pod"


def test_config_env_and_mounts(objects: list[Obj]) -> None:
    gw = gateway_container(objects)
    mounts = {m["mountPath"]: m for m in gw["volumeMounts"]}
    _, path = config_text(objects)              # MTLS_GATEWAY_CONFIG names a ConfigMap key
    assert os.path.dirname(path) in mounts
    for m in mounts.values():
        vol = volume(objects, m["name"])
        if "configMap" in vol or "secret" in vol:
            assert m.get("readOnly") is True, f"{m['mountPath']} must be mounted read-only"
    tls = [volume(objects, m["name"]) for m in mounts.values()
           if "secret" in volume(objects, m["name"])]
    assert len(tls) == 1
    secret = tls[0]["secret"]
    assert {i["key"] for i in secret["items"]} == SECRET_KEYS
    assert secret["defaultMode"] == 0o440
    # --workers > 1 needs a writable temporary folder; the root filesystem is read-only.
    assert "emptyDir" in volume(objects, mounts["/tmp"]["name"])


def test_upstream_is_the_app_container_on_loopback_only(objects: list[Obj],
                                                       config: GatewayConfig) -> None:
    urls = {config.upstream.url} | {r.upstream_url for r in config.routes if r.upstream_url}
    (app,) = app_containers(objects)
    listens = " ".join([*app.get("args", []), *env_of(app).values()])
    for url in urls:
        parts = urlsplit(url)
        assert parts.hostname is not None and ipaddress.ip_address(parts.hostname).is_loopback
        assert f"{parts.hostname}:{parts.port}" in listens, \
            f"the app container does not listen on {parts.hostname}:{parts.port}: {listens}"
        assert parts.port not in (config.listen.port, config.admin.port)
    assert "ports" not in app, "the app container must not declare (expose) ports"


def test_network_policy_opens_only_the_gateway_ports(objects: list[Obj],
                                                     config: GatewayConfig) -> None:
    policy = one(objects, "NetworkPolicy")["spec"]
    gw = gateway_container(objects)
    assert policy["policyTypes"] == ["Ingress"]
    opened: dict[int, list[Obj]] = {}
    for rule in policy["ingress"]:
        assert rule.get("ports"), "a rule without ports opens every port"
        for port in rule["ports"]:
            opened.setdefault(port_number(gw, port["port"]), []).append(rule)
    assert set(opened) == {config.listen.port, config.admin.port}
    assert urlsplit(config.upstream.url).port not in opened
    assert all("from" in rule for rule in opened[config.admin.port]), \
        "the admin port must be limited to chosen peers"


def test_selectors_select_the_pods(objects: list[Obj]) -> None:
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    table = [
        ("Deployment", deployment["spec"]["selector"]["matchLabels"]),
        ("Service", one(objects, "Service")["spec"]["selector"]),
        ("PodDisruptionBudget", one(objects, "PodDisruptionBudget")["spec"]["selector"]
         ["matchLabels"]),
        ("NetworkPolicy", one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]),
    ]
    for kind, selector in table:
        assert selector and selector.items() <= labels.items(), f"{kind} selects {selector}"
    assert deployment["spec"]["replicas"] >= 2, "one replica cannot survive a drain under a PDB"


def _dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", (REPO / "Dockerfile").read_text(), re.M)
    assert users, "Dockerfile: no numeric USER uid:gid"
    return int(users[-1][0]), int(users[-1][1])


@pytest.mark.parametrize("field_path", [
    ("runAsNonRoot", True), ("readOnlyRootFilesystem", True),
    ("allowPrivilegeEscalation", False), ("capabilities", {"drop": ["ALL"]}),
    ("seccompProfile", {"type": "RuntimeDefault"}),
])
def test_every_container_is_locked_down(objects: list[Obj], field_path: tuple[str, Any]) -> None:
    key, want = field_path
    for container in pod_spec(objects)["containers"]:
        assert container["securityContext"].get(key) == want, \
            f"{container['name']}: securityContext.{key}"


def test_pod_security_user_image_and_resources(objects: list[Obj]) -> None:
    spec = pod_spec(objects)
    gw = gateway_container(objects)
    uid, gid = _dockerfile_user()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert (gw["securityContext"]["runAsUser"], gw["securityContext"]["runAsGroup"]) == (uid, gid)
    assert spec["automountServiceAccountToken"] is False
    assert gw["image"] == GATEWAY_IMAGE
    for container in spec["containers"]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
        assert "memory" in resources["limits"], container["name"]


def test_the_pod_outlives_the_gateway_drain(target: str, objects: list[Obj]) -> None:
    raw = raw_config(target)
    drain = parse_duration(raw.get("shutdown_delay", 0)) + parse_duration(
        raw.get("shutdown_grace", "20s"))
    spec = pod_spec(objects)
    assert spec["terminationGracePeriodSeconds"] > drain
    for app in app_containers(objects):
        # the upstream stays up until the gateway has finished its in-flight requests
        sleep = app["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert drain <= sleep < spec["terminationGracePeriodSeconds"], app["name"]


def test_certificate_writes_the_secret_the_pod_mounts(objects: list[Obj]) -> None:
    certificates = [o for o in objects if o["kind"] == "Certificate"]
    (mounted,) = [v["secret"] for v in pod_spec(objects)["volumes"] if "secret" in v]
    if not certificates:
        # made by hand: deploy/README.md must create this very Secret with these keys
        readme = (DEPLOY / "README.md").read_text()
        command = re.search(r"kubectl create secret generic (\S+)(.*?)(?:\n\s*\n|```)",
                            readme, re.S)
        assert command, "deploy/README.md: no `kubectl create secret generic` step"
        assert command.group(1) == mounted["secretName"]
        keys = set(re.findall(r"--from-file=([\w.]+)=", command.group(2)))
        assert keys == {i["key"] for i in mounted["items"]}
        return
    (cert,) = certificates
    assert mounted["secretName"] == cert["spec"]["secretName"]
    service = one(objects, "Service")["metadata"]
    namespace = service.get("namespace", "default")
    assert f"{service['name']}.{namespace}.svc" in cert["spec"]["dnsNames"]
    assert "server auth" in cert["spec"]["usages"]


def test_the_overlay_is_another_app() -> None:
    base, payments = render("base"), render("overlays/example-payments")
    table = [
        ("Deployment name", one(base, "Deployment")["metadata"]["name"],
         one(payments, "Deployment")["metadata"]["name"]),
        ("app image", app_containers(base)[0]["image"], app_containers(payments)[0]["image"]),
        ("upstream", raw_config("base")["upstream"]["url"],
         raw_config("overlays/example-payments")["upstream"]["url"]),
        ("providers", sorted(raw_config("base")["providers"]),
         sorted(raw_config("overlays/example-payments")["providers"])),
    ]
    same = [what for what, a, b in table if a == b]
    assert not same, f"the overlay did not change: {same}"
    assert one(payments, "Deployment")["metadata"]["namespace"] == "payments"
    assert gateway_container(base)["image"] == gateway_container(payments)["image"]
