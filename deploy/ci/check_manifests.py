"""Asserts what the broker chart must render, on `helm template` output.

Usage: python check_manifests.py PROFILE RENDERED.yaml VALUES.yaml
Checks the workload shape of the profile, the pod's safety settings, probes, the
drain/grace-period relation, secrets wiring, and that the dashboard ConfigMap and the
PrometheusRule carry deploy/grafana/broker.json and deploy/prometheus/alerts.yaml exactly.
"""

import json
import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def main():
    profile, rendered, values_file = sys.argv[1], sys.argv[2], sys.argv[3]
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    values = yaml.safe_load(open(values_file)) or {}
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    cluster = profile.startswith("cluster")
    # The cluster profile may run the chart's own NATS (a StatefulSet, component nats).
    nats_sets = [d for d in by_kind.get("StatefulSet", [])
                 if d["metadata"]["labels"].get("app.kubernetes.io/component") == "nats"]
    for d in nats_sets:
        by_kind["StatefulSet"].remove(d)
    if not by_kind.get("StatefulSet"):
        by_kind.pop("StatefulSet", None)
    workload_kind = "StatefulSet" if profile == "single" else "Deployment"
    other = "Deployment" if profile == "single" else "StatefulSet"
    check(len(by_kind.get(workload_kind, [])) == 1, f"one {workload_kind}")
    check(other not in by_kind, f"no {other} in profile {profile}")
    w = by_kind[workload_kind][0]
    spec = w["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]

    if profile == "single":
        check(spec["replicas"] == 1, "single: one replica")
        claims = spec.get("volumeClaimTemplates", [])
        check([t["metadata"]["name"] for t in claims] == ["data"], "single: a PVC named data")
        check(not any(v["name"] == "data" for v in pod["volumes"]), "single: data is the PVC")
        cfg = yaml.safe_load(by_kind["ConfigMap"][0]["data"]["broker.yaml"])
        check(cfg["storage"]["url"] == "sqlite:///var/lib/broker/broker.db", "single: SQLite on the volume")
        check("Role" not in by_kind, "single: no RBAC")
        check(pod.get("automountServiceAccountToken") is False, "single: no service account token")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "single: readiness on /readyz")
    elif cluster:
        # Every replica active: the Service selects them all, no role label, no RBAC.
        services = {s_["metadata"]["name"]: s_ for s_ in by_kind["Service"]}
        main_svc = services[w["metadata"]["name"]]
        check("broker.io/role" not in main_svc["spec"]["selector"], "cluster: Service selects every replica")
        check("Role" not in by_kind, "cluster: no RBAC")
        check(pod.get("automountServiceAccountToken") is False, "cluster: no service account token")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "cluster: readiness on /readyz")
        env = {e["name"]: e for e in c["env"]}
        check("BROKER_K8S_ROLE_LABEL" not in env, "cluster: no role label")
        cfg = yaml.safe_load(by_kind["ConfigMap"][0]["data"]["broker.yaml"])
        url = cfg["storage"]["url"]
        check(url.startswith("nats://"), "cluster: storage on NATS")
        anti = pod.get("affinity", {}).get("podAntiAffinity", {})
        check(anti.get("preferredDuringSchedulingIgnoredDuringExecution"), "cluster: replicas spread over nodes")
        if "HorizontalPodAutoscaler" in by_kind:
            hpa = by_kind["HorizontalPodAutoscaler"][0]["spec"]
            check(hpa["minReplicas"] >= 2, "cluster: HPA keeps at least 2")
            check(hpa["scaleTargetRef"]["name"] == w["metadata"]["name"], "cluster: HPA scales the Deployment")
        check("PodDisruptionBudget" in by_kind, "cluster: a PDB for the brokers")
        if profile == "cluster":
            # The chart's own JetStream: 3 servers, a volume each, routes to each other,
            # a quorum kept through disruptions; the brokers reach its client Service.
            check(len(nats_sets) == 1, "cluster: the chart's NATS StatefulSet")
            if nats_sets:
                n = nats_sets[0]["spec"]
                check(n["replicas"] >= 3, "cluster: at least 3 NATS servers")
                args = n["template"]["spec"]["containers"][0]["args"]
                check("--jetstream" in args, "cluster: NATS with JetStream")
                routes = [a for a in args if a.startswith("--routes=")]
                check(routes and routes[0].count("nats://") == n["replicas"], "cluster: a route to every server")
                check([t["metadata"]["name"] for t in n.get("volumeClaimTemplates", [])] == ["data"],
                      "cluster: each NATS server keeps JetStream on a volume")
                svc = nats_sets[0]["metadata"]["name"]
                check(url == f"nats://{svc}:4222" and svc in services, "cluster: brokers use the NATS client Service")
            pdbs = [p for p in by_kind.get("PodDisruptionBudget", [])
                    if p["metadata"]["labels"].get("app.kubernetes.io/component") == "nats"]
            check(len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1, "cluster: NATS keeps a quorum")
            for p in pdbs:
                by_kind["PodDisruptionBudget"].remove(p)
        else:
            check(not nats_sets, "cluster with an existing NATS: no NATS of its own")
            check(url == "nats://nats.infra:4222", "cluster: the given NATS URL")
    else:
        # One active broker, standbys ready but unrouted: the Service selects the role
        # label the active broker puts on its own pod; RBAC lets it patch pods, no more.
        services = {s_["metadata"]["name"]: s_ for s_ in by_kind["Service"]}
        main_svc = services[w["metadata"]["name"]]
        check(main_svc["spec"]["selector"].get("broker.io/role") == "active", "ha: Service selects the active pod")
        headless = [s_ for s_ in by_kind["Service"] if s_["spec"].get("clusterIP") == "None"]
        check(len(headless) == 1 and "broker.io/role" not in headless[0]["spec"]["selector"],
              "ha: a headless Service over every pod (metrics)")
        env = {e["name"]: e for e in c["env"]}
        check(env.get("BROKER_K8S_ROLE_LABEL", {}).get("value") == "broker.io/role", "ha: role label on")
        check(env.get("BROKER_K8S_POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
              == "metadata.name", "ha: pod name from the downward API")
        check(pod.get("automountServiceAccountToken") is True, "ha: service account token mounted")
        roles = by_kind.get("Role", [])
        check(len(roles) == 1 and roles[0]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}],
              "ha: a Role with get/patch on pods only")
        binding = by_kind.get("RoleBinding", [{}])[0]
        check(binding.get("subjects", [{}])[0].get("name") == pod["serviceAccountName"], "ha: bound to the pods' account")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz?standby=ok", "ha: a standby counts as ready")
        strategy = spec["strategy"]["rollingUpdate"]
        check(strategy["maxUnavailable"] == 0, "ha: a new (standby) pod is ready before an old one goes")
        if "HorizontalPodAutoscaler" in by_kind:
            hpa = by_kind["HorizontalPodAutoscaler"][0]["spec"]
            check(hpa["minReplicas"] >= 2, "ha: HPA keeps at least 2")
            check(hpa["scaleTargetRef"]["name"] == w["metadata"]["name"], "ha: HPA scales the Deployment")
        else:
            check(spec["replicas"] >= 2, "ha: at least 2 replicas")
        env = {e["name"]: e for e in c["env"]}
        url = env.get("BROKER__STORAGE__URL", {})
        check("secretKeyRef" in url.get("valueFrom", {}), "ha: storage URL from a Secret")
        check("value" not in url, "ha: storage URL never inline")

    # Safety: non-root, read-only root, no privilege escalation, no capabilities.
    psc, sc = pod["securityContext"], c["securityContext"]
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, "runs as non-root")
    check(sc.get("readOnlyRootFilesystem") is True, "read-only root filesystem")
    check(sc.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], "drops all capabilities")
    check("resources" in c and c["resources"].get("requests"), "resource requests")

    # Probes and the drain.
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness on /healthz")
    check(c["readinessProbe"]["httpGet"]["path"].startswith("/readyz"), "readiness on /readyz")
    cfg = yaml.safe_load(by_kind["ConfigMap"][0]["data"]["broker.yaml"])
    drain = int(cfg["server"]["shutdown_timeout"].rstrip("s"))
    sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    check(pod["terminationGracePeriodSeconds"] == drain + sleep + 5,
          f"grace period {pod['terminationGracePeriodSeconds']} = drain {drain} + preStop {sleep} + 5")
    check(cfg["server"]["listen"] == "0.0.0.0:8080", "listens on the container port")

    # Nothing secret in the ConfigMap: chart-managed secrets are env: references.
    text = by_kind["ConfigMap"][0]["data"]["broker.yaml"]
    for name, spec_ in (values.get("secrets") or {}).items():
        if spec_.get("value"):
            check(spec_["value"] not in text, f"secret {name} not in the ConfigMap")

    # The dashboard and the rules are the files under deploy/, byte for byte.
    dash = [d for d in by_kind.get("ConfigMap", []) if "broker.json" in d.get("data", {})]
    check(len(dash) == 1, "a dashboard ConfigMap")
    if dash:
        check(json.loads(dash[0]["data"]["broker.json"]) == json.load(open(ROOT / "deploy/grafana/broker.json")),
              "dashboard ConfigMap == deploy/grafana/broker.json")
        check(dash[0]["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard sidecar label")
    if "PrometheusRule" in by_kind:
        rules = by_kind["PrometheusRule"][0]["spec"]["groups"]
        check(rules == yaml.safe_load(open(ROOT / "deploy/prometheus/alerts.yaml"))["groups"],
              "PrometheusRule == deploy/prometheus/alerts.yaml")
    if "ServiceMonitor" in by_kind:
        sel = by_kind["ServiceMonitor"][0]["spec"]["selector"]["matchLabels"]
        scraped = [s_ for s_ in by_kind["Service"] if sel.items() <= s_["metadata"]["labels"].items()]
        check(len(scraped) == 1 and scraped[0]["spec"].get("clusterIP") == "None",
              "ServiceMonitor scrapes every pod through the headless Service, once")
    if "PodDisruptionBudget" in by_kind:
        sel = by_kind["PodDisruptionBudget"][0]["spec"]["selector"]["matchLabels"]
        check(sel.items() <= spec["template"]["metadata"]["labels"].items(), "PDB selects the pods")

    if failures:
        for f in failures:
            print(f"FAIL  {profile}: {f}")
        sys.exit(1)
    print(f"  ok  {profile}: {len(docs)} objects as expected")


if __name__ == "__main__":
    main()
