#!/usr/bin/env bash
# Two hosts for real on one machine: two network namespaces joined by a veth pair, each a "host" with its
# own address (10.77.0.1/24 and 10.77.0.2/24), each running `torchrun --nnodes 2 --nproc-per-node 2` of
# `istfx train` with the rendezvous on the first host. Runs --topology ps and sharded, checks that the
# ranks' connections use the namespace addresses (not 127.0.0.1), and compares the trained model with the
# same job on one host (`istfx train`, 4 ranks on 127.0.0.1).
#
#   sudo scripts/two_hosts.sh                 # both topologies (~2-4 min on a loaded 2-core machine)
#   sudo scripts/two_hosts.sh sharded         # one of them
#
# Needs root (ip netns, veth). Everything it creates (namespaces, the veth pair, its temporary folder) is
# removed on exit, also on Ctrl-C or an error. PYTHON picks the interpreter (default: python3 on PATH).
# The namespaces share this machine's filesystem, as the nodes of a cluster share a filesystem for
# --save and --checkpoint-dir (every rank writes its own files there under --topology sharded).
set -euo pipefail

PYTHON=${PYTHON:-python3}
TOPOLOGIES=${*:-ps sharded}
NS1=istfx-h1 NS2=istfx-h2 V1=istfx-v1 V2=istfx-v2
ADDR1=10.77.0.1 ADDR2=10.77.0.2 PORT=29533
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/istfx-two-hosts-XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    ip netns del "$NS1" 2>/dev/null || true   # deleting a namespace removes its end of the veth pair
    ip netns del "$NS2" 2>/dev/null || true
    ip link del "$V1" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

if [ "$(id -u)" != 0 ]; then echo "two_hosts.sh: needs root (ip netns, veth)" >&2; exit 2; fi
cleanup_stale() { ip netns del "$NS1" 2>/dev/null || true; ip netns del "$NS2" 2>/dev/null || true; }
cleanup_stale

# -- the two hosts --------------------------------------------------------------------------------
ip netns add "$NS1"
ip netns add "$NS2"
ip link add "$V1" type veth peer name "$V2"
ip link set "$V1" netns "$NS1"
ip link set "$V2" netns "$NS2"
ip -n "$NS1" addr add "$ADDR1/24" dev "$V1"
ip -n "$NS2" addr add "$ADDR2/24" dev "$V2"
for ns in "$NS1" "$NS2"; do ip -n "$ns" link set lo up; done
ip -n "$NS1" link set "$V1" up
ip -n "$NS2" link set "$V2" up
reach=""
for _ in 1 2 3 4 5; do  # a closed port answers "refused" once the link is up
    reach=$(ip netns exec "$NS1" "$PYTHON" -c "import socket; socket.create_connection(('$ADDR2', 9), 2)" 2>&1 || true)
    case "$reach" in *refused*) break ;; esac
    sleep 1
done
case "$reach" in *refused*) ;; *) echo "two_hosts.sh: $ADDR2 is not reachable from $NS1: $reach" >&2; exit 1 ;; esac
echo "hosts: $NS1 $ADDR1 ($V1) <-> $NS2 $ADDR2 ($V2)"

cat > "$WORK/net.py" <<'EOF'
import torch
from torch import nn


def build_model():  # 64 -> 96 (BatchNorm) -> 64 -> 10
    return nn.Sequential(nn.Linear(64, 96), nn.BatchNorm1d(96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(),
                         nn.Linear(64, 10))


example_inputs = (torch.randn(8, 64),)
EOF
COMMON=(--subnets 4 --rounds 3 --local-steps 2 --batch-size 32 --lr 0.3 --seed 7 --threads 1 --quiet
        --eval-every 100 --timeout 300)

node() {  # node RANK NAMESPACE IFNAME TOPOLOGY: one host's torchrun
    local rank=$1 ns=$2 ifname=$3 topology=$4
    ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$ifname" OMP_NUM_THREADS=1 PYTHONPATH="$HERE" \
        "$PYTHON" -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --node-rank "$rank" \
        --master-addr "$ADDR1" --master-port "$PORT" \
        -m istfx.cli.train "$WORK/net.py" "${COMMON[@]}" --topology "$topology" \
        --save "$WORK/$topology-two-hosts.safetensors" --metrics "$WORK/$topology-two-hosts.jsonl" \
        >"$WORK/$topology-node$rank.log" 2>&1
}

status=0
for topology in $TOPOLOGIES; do
    echo "== $topology: torchrun --nnodes 2 --nproc-per-node 2 --master-addr $ADDR1 (node 0 in $NS1, node 1 in $NS2)"
    node 0 "$NS1" "$V1" "$topology" & PIDS+=($!); first=$!
    node 1 "$NS2" "$V2" "$topology" & PIDS+=($!); second=$!
    # While the job runs: every TCP socket in each namespace (only this job runs there), sampled
    : >"$WORK/$topology-$NS1.sockets"; : >"$WORK/$topology-$NS2.sockets"
    while kill -0 "$first" 2>/dev/null || kill -0 "$second" 2>/dev/null; do
        for ns in "$NS1" "$NS2"; do
            ip netns exec "$ns" ss -Htn state established 2>/dev/null | awk '{print $3" -> "$4}' \
                >>"$WORK/$topology-$ns.sockets" || true
            ip netns exec "$ns" ss -Htln 2>/dev/null | awk '{print "listen "$4}' >>"$WORK/$topology-$ns.sockets" || true
        done
        sleep 0.5
    done
    for ns in "$NS1" "$NS2"; do sort -u -o "$WORK/$topology-$ns.sockets" "$WORK/$topology-$ns.sockets"; done
    code=0
    wait "$first" || code=$?
    wait "$second" || code=$((code + $?))
    if [ "$code" != 0 ]; then
        echo "two-host $topology job failed:"; tail -n 30 "$WORK/$topology-node0.log" "$WORK/$topology-node1.log"
        status=1; continue
    fi
    echo "   sockets seen ($NS1 then $NS2; local -> peer, ports folded):"
    for ns in "$NS1" "$NS2"; do
        sed -E 's/:[0-9]+( |$)/:PORT\1/g' "$WORK/$topology-$ns.sockets" | sort | uniq -c | sed "s/^/     $ns /"
    done
    if grep -v '^listen' "$WORK/$topology-$NS1.sockets" "$WORK/$topology-$NS2.sockets" | grep -q '127\.0\.0\.1'; then
        echo "   FAIL: a rank talks over 127.0.0.1"; status=1
    elif ! grep -q "$ADDR2" "$WORK/$topology-$NS1.sockets" || ! grep -q "$ADDR1" "$WORK/$topology-$NS2.sockets"; then
        echo "   FAIL: no connection between $ADDR1 and $ADDR2 was seen"; status=1
    else
        echo "   ok: the ranks connect over $ADDR1 <-> $ADDR2 only"
    fi
    echo "== $topology: the same job on one host (istfx train, 4 ranks on 127.0.0.1)"
    (cd "$WORK" && OMP_NUM_THREADS=1 PYTHONPATH="$HERE" "$PYTHON" -m istfx.cli.train "$WORK/net.py" "${COMMON[@]}" \
        --topology "$topology" --save "$WORK/$topology-one-host.safetensors" \
        --metrics "$WORK/$topology-one-host.jsonl" >"$WORK/$topology-one-host.log" 2>&1) || {
        echo "one-host $topology job failed:"; tail -n 30 "$WORK/$topology-one-host.log"; status=1; continue; }
    "$PYTHON" - "$WORK" "$topology" <<'EOF' || status=1
import json, sys
import torch
from istfx.runtime.checkpoint import load_file

work, topology = sys.argv[1], sys.argv[2]
two, _ = load_file(f"{work}/{topology}-two-hosts.safetensors")
one, _ = load_file(f"{work}/{topology}-one-host.safetensors")
assert two.keys() == one.keys(), "the saved models differ in their tensors"
exact = [n for n in one if torch.equal(one[n], two[n])]
worst = max(((one[n].double() - two[n].double()).abs().max().item() for n in one), default=0.0)
rows = lambda path: [json.loads(line) for line in open(path)]
losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(rows(f"{work}/{topology}-two-hosts.jsonl"),
                                                               rows(f"{work}/{topology}-one-host.jsonl"))]
print(f"   two hosts vs one host: {len(exact)}/{len(one)} tensors bit for bit equal, largest difference {worst:.3g}; "
      "train loss per round " + ", ".join(f"{a:.6f}/{b:.6f}" for a, b in losses))
if worst > 1e-5:
    sys.exit("   FAIL: the two-host model differs from the one-host model")
EOF
done
exit $status
