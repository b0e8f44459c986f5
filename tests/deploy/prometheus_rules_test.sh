#!/usr/bin/env bash
# deploy/prometheus with promtool: the scrape config and the rules are valid, the rule unit
# tests pass, a rule with a wrong threshold fails those unit tests (they can fail), and the
# Kubernetes PrometheusRule is in sync with the rules file.
# Usage: prometheus_rules_test.sh REPO_ROOT
# Prints PASS/FAIL lines and "N passed, M failed".
set -u
REPO=$1
DIR=$REPO/deploy/prometheus
PASSED=0 FAILED=0
ok() { echo "PASS: $*"; PASSED=$((PASSED + 1)); }
bad() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }
run() {  # run DESCRIPTION COMMAND...: passes when the command exits 0
  local what=$1; shift
  if out=$("$@" 2>&1); then ok "$what"; else bad "$what"; echo "$out" | tail -20; fi
}
if ! command -v promtool >/dev/null; then
  bad "promtool not installed (apt-get install prometheus; deploy/dev/setup.sh does)"
  echo "$PASSED passed, $FAILED failed"; exit 1
fi
TMP=$(mktemp -d /tmp/sparsekv-rules-test.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

run "promtool check config prometheus.yml (and the rule file it loads)" \
  promtool check config "$DIR/prometheus.yml"
run "promtool check rules sparsekv.rules.yml" promtool check rules "$DIR/sparsekv.rules.yml"
run "promtool test rules sparsekv.rules_test.yml" \
  bash -c "cd '$DIR' && promtool test rules sparsekv.rules_test.yml"

# A mutant whose capacity threshold moved from 0.9 to 0.99 must fail the unit tests.
cp "$DIR/sparsekv.rules_test.yml" "$TMP/"
sed 's/^\( *\)> 0\.9$/\1> 0.99/' "$DIR/sparsekv.rules.yml" >"$TMP/sparsekv.rules.yml"
if cmp -s "$DIR/sparsekv.rules.yml" "$TMP/sparsekv.rules.yml"; then
  bad "mutant: the capacity threshold line '> 0.9' was not found"
elif (cd "$TMP" && promtool test rules sparsekv.rules_test.yml >/dev/null 2>&1); then
  bad "the unit tests pass a rule file whose capacity threshold is 0.99"
else
  ok "the unit tests fail on a rule file whose capacity threshold is 0.99"
fi

run "deploy/k8s/base/prometheusrule.yaml is in sync (deploy/k8s/sync-rules.sh --check)" \
  bash "$REPO/deploy/k8s/sync-rules.sh" --check

echo "$PASSED passed, $FAILED failed"
[ $FAILED = 0 ]
