// Validates the Prometheus Operator objects (ServiceMonitor, PrometheusRule) in rendered
// manifests against the operator's CRD schemas, which kubernetes-validate does not know.
// Usage: node validate-crds.mjs FILE...  (exit 1 on any invalid object, or on none found)
import fs from 'node:fs';
import yaml from 'js-yaml';
import { ServiceMonitor, PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';

const kinds = { ServiceMonitor, PrometheusRule };
let checked = 0;
let invalid = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, 'utf8'))) {
    if (!doc || !(doc.kind in kinds) || doc.apiVersion !== 'monitoring.coreos.com/v1') continue;
    const name = `${file}: ${doc.kind}/${doc.metadata?.name}`;
    try {
      new kinds[doc.kind](doc).validate();
      checked++;
      console.log(`valid   ${name}`);
    } catch (e) {
      invalid++;
      console.log(`INVALID ${name}: ${e.message}`);
    }
  }
}
if (checked + invalid === 0) {
  console.log('no ServiceMonitor or PrometheusRule found');
  process.exit(1);
}
process.exit(invalid ? 1 : 0);
