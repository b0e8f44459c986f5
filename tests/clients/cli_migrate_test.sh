#!/usr/bin/env bash
# `sparsekv export`, `import` and `migrate` between two real servers: the moved session reads
# back byte for byte and answers the same decode step bit for bit; a damaged snapshot file is
# refused and adds nothing; missing flags are usage errors.
#
# usage: cli_migrate_test.sh SERVER_BIN CLI_BIN
set -euo pipefail
SERVER_BIN=${1:?usage: cli_migrate_test.sh SERVER_BIN CLI_BIN}
CLI_BIN=${2:?usage: cli_migrate_test.sh SERVER_BIN CLI_BIN}
PY=/usr/bin/python3
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

start() {  # start NAME: a server on free ports; sets PORT_<NAME>
  "$SERVER_BIN" --listen=127.0.0.1:0 --metrics_listen= --ready_file="$TMP/$1.ready" \
    >"$TMP/$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do [[ -f "$TMP/$1.ready" ]] && break; sleep 0.1; done
  [[ -f "$TMP/$1.ready" ]] || fail "server $1 did not start"
  printf -v "PORT_$1" '%s' "$(sed -n 's/^grpc_port=//p' "$TMP/$1.ready")"
}
start A
start B
cli() { local s=$1; shift; "$CLI_BIN" --server="127.0.0.1:$s" --timeout=20s "$@"; }

"$PY" -c "import numpy as n; r=n.random.default_rng(3)
n.save('$TMP/k.npy', r.standard_normal((2,300,2,64), dtype=n.float32))
n.save('$TMP/v.npy', r.standard_normal((2,300,2,64), dtype=n.float32))
n.save('$TMP/q.npy', r.standard_normal((8,64), dtype=n.float32))"
for id in one two; do
  cli "$PORT_A" create --id "$id" --layers 2 --kv_heads 2 --q_heads 8 --head_dim 64 \
    --k_sparsity 0.7 --v_sparsity 0.5 >/dev/null
  cli "$PORT_A" append "$id" --k "$TMP/k.npy" --v "$TMP/v.npy" >/dev/null
  cli "$PORT_A" flush "$id" >/dev/null
done

# export -> file -> import on B
cli "$PORT_A" export one --out "$TMP/one.snap" | grep -q "exported one" || fail "export"
cli "$PORT_B" import --in "$TMP/one.snap" | grep -q "imported one" || fail "import"
# migrate: on B afterwards, gone from A
cli "$PORT_A" migrate two --to "127.0.0.1:$PORT_B" | grep -q "migrated two" || fail "migrate"
rc=0; cli "$PORT_A" get two >/dev/null 2>&1 || rc=$?
[[ $rc -eq 1 ]] || fail "two still on A after migrate (exit $rc)"

for id in one two; do
  src=$PORT_A; [[ $id == two ]] && src=""
  cli "$PORT_B" read "$id" --k_out "$TMP/$id.kb.npy" --v_out "$TMP/$id.vb.npy" >/dev/null
  cli "$PORT_B" attend "$id" --layer 1 --q "$TMP/q.npy" --out "$TMP/$id.ob.npy" >/dev/null
done
cli "$PORT_A" read one --k_out "$TMP/one.ka.npy" --v_out "$TMP/one.va.npy" >/dev/null
cli "$PORT_A" attend one --layer 1 --q "$TMP/q.npy" --out "$TMP/one.oa.npy" >/dev/null
cmp -s "$TMP/one.ka.npy" "$TMP/one.kb.npy" || fail "K differs after export/import"
cmp -s "$TMP/one.va.npy" "$TMP/one.vb.npy" || fail "V differs after export/import"
cmp -s "$TMP/one.oa.npy" "$TMP/one.ob.npy" || fail "decode differs after export/import"
# two came from the same uploads as one: same contents
cmp -s "$TMP/one.kb.npy" "$TMP/two.kb.npy" || fail "K differs after migrate"
cmp -s "$TMP/one.ob.npy" "$TMP/two.ob.npy" || fail "decode differs after migrate"

# a damaged file: refused (server error), nothing added
"$PY" -c "d=bytearray(open('$TMP/one.snap','rb').read()); d[len(d)//2]^=1
open('$TMP/bad.snap','wb').write(d)"
cli "$PORT_B" delete one >/dev/null
rc=0; cli "$PORT_B" import --in "$TMP/bad.snap" >"$TMP/bad.out" 2>"$TMP/bad.err" || rc=$?
[[ $rc -eq 1 ]] || fail "damaged import exited $rc"
grep -q "DATA_LOSS" "$TMP/bad.err" || { cat "$TMP/bad.err"; fail "no DATA_LOSS"; }
rc=0; cli "$PORT_B" get one >/dev/null 2>&1 || rc=$?
[[ $rc -eq 1 ]] || fail "a damaged import added the session"
# usage errors
rc=0; cli "$PORT_A" export one >/dev/null 2>&1 || rc=$?; [[ $rc -eq 2 ]] || fail "export without --out: $rc"
rc=0; cli "$PORT_A" import >/dev/null 2>&1 || rc=$?; [[ $rc -eq 2 ]] || fail "import without --in: $rc"
rc=0; cli "$PORT_A" migrate one >/dev/null 2>&1 || rc=$?; [[ $rc -eq 2 ]] || fail "migrate without --to: $rc"
echo "PASS: export, import and migrate move sessions bit for bit; damage refused"
