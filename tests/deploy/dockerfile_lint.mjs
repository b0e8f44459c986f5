// Lints deploy/docker/Dockerfile.* with dockerfile-utils (the linter behind common Dockerfile
// editors): syntax, flags, instruction arguments. Every diagnostic, warning or error, fails.
// check.py adds this project's own rules and runs the build steps.
// Usage: node dockerfile_lint.mjs NPM_DIR DOCKERFILE...
// Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const [npmDir, ...files] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(npmDir), "package.json"));
const { validate } = require("dockerfile-utils");

let passed = 0, failed = 0;
const check = (cond, msg, detail = "") => {
  if (cond) { passed++; console.log(`PASS: ${msg}`); }
  else { failed++; console.log(`FAIL: ${msg}${detail ? ": " + detail : ""}`); }
};
const where = (d) => `line ${d.range.start.line + 1}: ${d.message}`;
for (const f of files) {
  const diags = validate(fs.readFileSync(f, "utf8"), {});
  check(diags.length === 0, `${path.basename(f)}: dockerfile-utils reports nothing`, diags.map(where).join("; "));
}
// The linter must catch the kind of slip it is here for.
const canary = "FROM debian:12 AS builder\nHEALTHCHECK CMD\nEXPOSE grpc\nCOPY --form=builder /a /b\n";
const found = validate(canary, {});
check(found.length >= 3, `the linter flags a broken Dockerfile (${found.length} diagnostics)`, found.map(where).join("; "));
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
