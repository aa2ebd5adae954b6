// Print the Khronos glTF-Validator report for one .glb/.gltf file as JSON on stdout.
// Usage: node tests/gltf_validator.mjs FILE
// The validator is resolved from tests/.node (npm install --prefix tests/.node gltf-validator@2.0.0-dev.3.10),
// or from the environment variable GLTF_VALIDATOR_DIR pointing at a node_modules/gltf-validator folder.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, ".node", "package.json"));
const validator = require(process.env.GLTF_VALIDATOR_DIR || "gltf-validator");

const file = process.argv[2];
if (!file) {
  console.error("usage: node gltf_validator.mjs FILE");
  process.exit(2);
}
try {
  const report = await validator.validateBytes(new Uint8Array(readFileSync(file)), {
    uri: file, maxIssues: 0, writeTimestamp: false,
  });
  console.log(JSON.stringify(report, null, 1));
} catch (error) {
  console.error(String(error));
  process.exit(1);
}
