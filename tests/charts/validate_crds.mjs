// Validates custom resources against their CRDs' OpenAPI schemas, as packaged by kubernetes-models:
//   node validate_crds.mjs MODULES_DIR < docs.json
// stdin: a JSON array of objects; stdout: a JSON array of {kind, name, ok, error} in the same order.
// MODULES_DIR is the node_modules folder that `make chart-tools` fills (.tools/crd-models/node_modules).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const load = (rel) => import(pathToFileURL(join(modules, rel)).href);

const monitoring = await load("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js");
const keda = await load("@kubernetes-models/keda/keda.sh/v1alpha1/index.js");
const gatewayApi = await load("@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/index.js");
const models = {
  "monitoring.coreos.com/v1": monitoring,
  "keda.sh/v1alpha1": keda,
  "gateway.networking.k8s.io/v1": gatewayApi,
};

const docs = JSON.parse(readFileSync(0, "utf8"));
const results = docs.map((doc) => {
  const result = { kind: doc.kind, name: doc.metadata?.name, ok: false, error: null };
  const Model = models[doc.apiVersion]?.[doc.kind];
  if (!Model) {
    result.error = `no CRD model for ${doc.apiVersion} ${doc.kind}`;
    return result;
  }
  try {
    new Model(doc).validate();
    result.ok = true;
  } catch (err) {
    result.error = String(err.message ?? err);
  }
  return result;
});
process.stdout.write(JSON.stringify(results));
