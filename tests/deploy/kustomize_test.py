"""deploy/k8s: `kubectl kustomize` builds the base and the gpu and tls
overlays; the objects are wired together (selectors, named ports, volumes,
secrets); the PrometheusRule holds exactly the rules promtool checks; and the
real mergeguard-server accepts the Deployment's arguments and answers the
probes (the TLS overlay's exec probes are run against a TLS server)."""

import os
import shutil
import subprocess

import yaml

import deploy_testlib as t

K8S = os.path.join(t.DEPLOY, "k8s")
BASE_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy",
              "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"}


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def server_container(deployment):
    containers = deployment["spec"]["template"]["spec"]["containers"]
    named = [c for c in containers if c["name"] == "server"]
    t.check(len(named) == 1, "Deployment has one container named server")
    return named[0] if named else containers[0]


def flag_values(container):
    values = {}
    for arg in container.get("args", []):
        t.check(arg.startswith("--") and "=" in arg, "argument %r is --flag=value" % arg)
        name, _, value = arg[2:].partition("=")
        values[name] = value
    return values


def check_base(objects):
    kinds = {o["kind"] for o in objects}
    t.check(BASE_KINDS <= kinds, "base has %s (got %s)" % (sorted(BASE_KINDS), sorted(kinds)))
    for o in objects:
        t.check(o["metadata"].get("namespace") == "mergeguard",
                "%s/%s is in namespace mergeguard" % (o["kind"], o["metadata"]["name"]))
    deployment = t.find(objects, "Deployment")
    service = t.find(objects, "Service")
    pvc = t.find(objects, "PersistentVolumeClaim")
    policy = t.find(objects, "NetworkPolicy")
    pdb = t.find(objects, "PodDisruptionBudget")
    monitor = t.find(objects, "ServiceMonitor")
    if None in (deployment, service, pvc, policy, pdb, monitor):
        return
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    container = server_container(deployment)
    flags = flag_values(container)

    t.check(labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels),
            "Deployment selector matches its pods")
    t.check(deployment["spec"].get("strategy", {}).get("type") == "Recreate",
            "Deployment recreates (two servers must never share a store)")

    # Unknown flags would stop the server; the helper lists the real ones.
    known = t.server_flags()
    for name in flags:
        t.check(name in known, "--%s is a mergeguard-server flag" % name)

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    t.check(ports.get("grpc") == 50051 and ports.get("metrics") == 9464,
            "container ports grpc=50051 and metrics=9464 (got %s)" % ports)
    t.check(flags.get("port", "50051") == "50051", "--port matches the grpc port")
    t.check(flags.get("metrics_port", "9464") == "9464", "--metrics_port matches the metrics port")

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container.get(probe, {}).get("grpc")
        t.check(grpc is not None and grpc.get("port") == 50051,
                "%s is a native gRPC probe on port 50051 (got %s)" % (probe, container.get(probe)))

    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        t.check({"cpu", "memory"} <= set(resources.get(kind, {})),
                "container %s set cpu and memory" % kind)

    pod_security = spec.get("securityContext", {})
    security = container.get("securityContext", {})
    t.check(pod_security.get("runAsNonRoot") is True, "pod runs as non-root")
    t.check(isinstance(pod_security.get("runAsUser"), int) and pod_security["runAsUser"] > 0,
            "pod runs as a numeric non-root uid")
    t.check(security.get("readOnlyRootFilesystem") is True, "root filesystem is read-only")
    t.check(security.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    t.check(security.get("capabilities", {}).get("drop") == ["ALL"], "all capabilities dropped")

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    store_volume = volumes.get(mounts.get(flags.get("store_dir")), {})
    t.check(store_volume.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"],
            "--store_dir is the mount of the PersistentVolumeClaim")
    tokens_dir = os.path.dirname(flags.get("tokens_file", ""))
    tokens_volume = volumes.get(mounts.get(tokens_dir), {})
    t.check("secret" in tokens_volume, "--tokens_file lies in a Secret volume")
    t.check("emptyDir" in volumes.get(mounts.get("/tmp"), {}), "/tmp is a writable emptyDir")

    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    t.check(set(service_ports) == {"grpc", "metrics"}, "Service ports are grpc and metrics")
    for name, port in service_ports.items():
        t.check(port.get("targetPort") in (name, ports.get(name)),
                "Service port %s targets the container port" % name)
    t.check(labels_match(service["spec"]["selector"], pod_labels), "Service selects the pods")

    t.check(labels_match(policy["spec"]["podSelector"]["matchLabels"], pod_labels),
            "NetworkPolicy applies to the pods")
    t.check("Ingress" in policy["spec"].get("policyTypes", []), "NetworkPolicy restricts ingress")
    rules = policy["spec"].get("ingress", [])
    t.check(all(rule.get("from") for rule in rules), "no ingress rule admits every source")
    for rule in rules:
        for peer in rule["from"]:
            t.check("ipBlock" not in peer and "namespaceSelector" in peer,
                    "ingress peers are selected by namespace: %s" % peer)
    allowed = {}
    for rule in rules:
        for port in rule.get("ports", []):
            allowed.setdefault(port["port"], []).extend(rule["from"])
    t.check(set(allowed) == {"grpc", "metrics"}, "only grpc and metrics are reachable")
    t.check(all("podSelector" not in p for p in allowed.get("grpc", [])) and allowed.get("grpc"),
            "grpc is open to the gateway's namespace")
    t.check(allowed.get("metrics") and all("podSelector" in p for p in allowed["metrics"]),
            "metrics is open to the Prometheus pods only")

    t.check(labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels),
            "PodDisruptionBudget selects the pods")
    t.check(labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]),
            "ServiceMonitor selects the Service")
    t.check([e.get("port") for e in monitor["spec"]["endpoints"]] == ["metrics"],
            "ServiceMonitor scrapes the metrics port")


def check_prometheus_rule(objects):
    rule = t.find(objects, "PrometheusRule")
    with open(os.path.join(t.DEPLOY, "prometheus", "mergeguard-rules.yaml")) as f:
        rules_file = yaml.safe_load(f)
    t.check(rule is not None and rule["spec"] == rules_file,
            "the PrometheusRule's spec equals deploy/prometheus/mergeguard-rules.yaml")
    sync = t.run([os.path.join(t.DEPLOY, "prometheus", "sync-prometheusrule"), "--check"])
    t.check(sync.returncode == 0, "sync-prometheusrule --check:\n" + sync.stdout + sync.stderr)


def check_gpu(base, objects):
    t.check({o["kind"] for o in objects} == {o["kind"] for o in base},
            "gpu overlay keeps every base object")
    deployment = t.find(objects, "Deployment")
    if deployment is None:
        return
    spec = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    resources = container.get("resources", {})
    limit = resources.get("limits", {}).get("nvidia.com/gpu")
    request = resources.get("requests", {}).get("nvidia.com/gpu")
    t.check(limit is not None and int(limit) >= 1, "gpu overlay limits nvidia.com/gpu >= 1")
    t.check(request == limit, "nvidia.com/gpu request equals the limit")
    t.check(any(tol.get("key") == "nvidia.com/gpu" for tol in spec.get("tolerations", [])),
            "gpu overlay tolerates the nvidia.com/gpu taint")
    t.check(bool(spec.get("nodeSelector")), "gpu overlay selects GPU nodes")
    t.check(container["image"].endswith("-cuda"), "gpu overlay runs the CUDA image")
    base_container = server_container(t.find(base, "Deployment"))
    t.check(container.get("args") == base_container.get("args") and
            container.get("securityContext") == base_container.get("securityContext") and
            container.get("livenessProbe") == base_container.get("livenessProbe"),
            "gpu overlay keeps the base's args, security context and probes")


def local_paths(deployment, root, secret_files):
    """Maps each volume mount of the server container to a local directory,
    filled with the files its Secret would hold. Returns {mountPath: dir}."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mapping = {}
    for mount in server_container(deployment)["volumeMounts"]:
        local = os.path.join(root, mount["name"])
        os.makedirs(local, exist_ok=True)
        secret = volumes[mount["name"]].get("secret")
        if secret:
            items = secret.get("items") or [{"key": k, "path": k}
                                            for k in secret_files[secret["secretName"]]]
            for item in items:
                with open(os.path.join(local, item["path"]), "w") as f:
                    f.write(secret_files[secret["secretName"]][item["key"]])
        mapping[mount["mountPath"]] = local
    return mapping


def localize(value, mapping):
    for mount, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        if value == mount or value.startswith(mount + "/"):
            return local + value[len(mount):]
    return value


def start_from_manifest(deployment, root, secret_files):
    mapping = local_paths(deployment, root, secret_files)
    args = [localize_arg(a, mapping) for a in server_container(deployment)["args"]]
    return t.Server(root, args + ["--replica=test"]), mapping


def localize_arg(arg, mapping):
    name, _, value = arg.partition("=")
    return name + "=" + localize(value, mapping)


def health(server_address, extra=(), env=None):
    return t.run([os.path.join(t.BIN, "mergeguard"), "health", "--server", server_address,
                  "--timeout", "10"] + list(extra), env=env)


def check_servers(base, tls):
    token_file = "%s acme user\n" % ("x" * 32)
    root = t.temp_dir("mergeguard-kustomize")
    servers = []
    try:
        # The base's arguments, paths moved under `root`: the server starts
        # (every flag parses, the token file is where the Secret puts it) and
        # its health service answers on the gRPC port the probes use.
        base_root = os.path.join(root, "base")
        os.makedirs(base_root)
        server, _ = start_from_manifest(t.find(base, "Deployment"), base_root,
                                        {"mergeguard-tokens": {"tokens": token_file}})
        servers.append(server)
        result = health("127.0.0.1:%d" % server.port)
        t.check(result.returncode == 0 and "SERVING" in result.stdout,
                "server started from the base Deployment is SERVING: %s%s" %
                (result.stdout, result.stderr))

        # The TLS overlay: its exec probes succeed against the TLS server and
        # fail against a plaintext one.
        cert_dir = os.path.join(root, "certs")
        os.makedirs(cert_dir)
        certs = t.make_tls_certificates(cert_dir)
        tls_files = {}
        for name, path in certs.items():
            with open(path) as f:
                tls_files[name] = f.read()
        tls_root = os.path.join(root, "tls")
        os.makedirs(tls_root)
        deployment = t.find(tls, "Deployment")
        tls_server, mapping = start_from_manifest(
            deployment, tls_root,
            {"mergeguard-tokens": {"tokens": token_file}, "mergeguard-tls": tls_files})
        servers.append(tls_server)
        container = server_container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            if not t.check(command and command[0] == "mergeguard",
                           "tls overlay %s runs the mergeguard CLI" % probe):
                continue
            local = [os.path.join(t.BIN, "mergeguard")] + [
                localize(c, mapping).replace(":50051", ":%d" % tls_server.port)
                for c in command[1:]]
            # The probe's own deadline is for a cluster; a loaded 2-core test
            # machine gets more.
            if "--timeout" in local:
                local[local.index("--timeout") + 1] = "60"
            result = t.run(local)
            t.check(result.returncode == 0 and "SERVING" in result.stdout,
                    "tls %s passes against the TLS server: %s%s" %
                    (probe, result.stdout, result.stderr))
            plain = [c.replace(":%d" % tls_server.port, ":%d" % server.port) for c in local]
            t.check(t.run(plain).returncode != 0,
                    "tls %s fails against a plaintext server" % probe)
    except (RuntimeError, KeyError, subprocess.SubprocessError) as error:
        t.fail("starting servers from the manifests: %s" % error)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def check_tls(base, objects):
    deployment = t.find(objects, "Deployment")
    if deployment is None:
        return
    flags = flag_values(server_container(deployment))
    t.check(flags.get("tls_cert", "").startswith("/etc/mergeguard/tls/") and
            flags.get("tls_key", "").startswith("/etc/mergeguard/tls/"),
            "tls overlay passes --tls_cert and --tls_key from the Secret mount")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    t.check(volumes.get("tls", {}).get("secret", {}).get("secretName") == "mergeguard-tls",
            "tls overlay mounts the mergeguard-tls Secret")


def main():
    base = t.kustomize(os.path.join(K8S, "base"))
    gpu = t.kustomize(os.path.join(K8S, "overlays", "gpu"))
    tls = t.kustomize(os.path.join(K8S, "overlays", "tls"))
    check_base(base)
    check_prometheus_rule(base)
    check_gpu(base, gpu)
    check_tls(base, tls)
    if t.find(base, "Deployment") and t.find(tls, "Deployment"):
        check_servers(base, tls)
    t.finish()


if __name__ == "__main__":
    main()
