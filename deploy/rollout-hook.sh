#!/usr/bin/env bash
# A partitioned in-place rollout that pre-warms each batch before it starts.
#
# Works with an OpenKruise CloneSet (or Advanced StatefulSet) using
# `updateStrategy.partition`: pods with ordinal >= partition get the new image. The
# nodes of the next batch are pre-warmed through the P2P network first, so the in-place
# restart finds the image already on the node.
#
#   rollout-hook.sh NAMESPACE CLONESET NEW_IMAGE 1 5 10
#
# Needs: kubectl, jq, dfget, DFP2P_SUPERNODE=http://<supernode service>:8080 reachable.
set -euo pipefail
ns=$1 name=$2 image=$3; shift 3
sizes=("$@")
: "${DFP2P_SUPERNODE:?set DFP2P_SUPERNODE to the supernode API, e.g. http://10.96.0.80:8080}"

replicas=$(kubectl -n "$ns" get cloneset "$name" -o jsonpath='{.spec.replicas}')
selector=$(kubectl -n "$ns" get cloneset "$name" -o json | jq -r '.spec.selector.matchLabels | to_entries | map("\(.key)=\(.value)") | join(",")')

# Pods in the order the partition releases them (highest ordinal first for CloneSet's
# default scatter-less ordering; adjust to your controller's order).
mapfile -t nodes < <(kubectl -n "$ns" get pods -l "$selector" -o json \
  | jq -r '.items | sort_by(.metadata.name) | reverse | .[].spec.nodeName')

# The whole plan as ordered batches: one line per batch of node names (the daemons' host
# ids are the node names, see dfdaemon.yaml).
plan=$(mktemp); trap 'rm -f "$plan"' EXIT
i=0
for s in "${sizes[@]}"; do
  echo "${nodes[*]:i:s}" | tr ' ' ',' >> "$plan"
  i=$((i + s))
done
[ "$i" -lt "${#nodes[@]}" ] && echo "${nodes[*]:i}" | tr ' ' ',' >> "$plan"

# Start warming every batch in order now; the job is idempotent, so the per-batch calls
# below attach to it.
dfget prewarm "$image" --batches "$plan" --timeout 30m

kubectl -n "$ns" patch cloneset "$name" --type merge \
  -p "{\"spec\":{\"updateStrategy\":{\"partition\":$replicas},\"template\":{\"spec\":{\"containers\":[{\"name\":\"$name\",\"image\":\"$image\"}]}}}}"
done_pods=0 k=1
for s in "${sizes[@]}"; do
  # The hook: returns when batch k is warm on its nodes; non-zero (with the failed nodes
  # and why) otherwise, and the rollout stops here.
  dfget prewarm "$image" --batches "$plan" --timeout 30m --batch "$k"
  done_pods=$((done_pods + s)); k=$((k + 1))
  kubectl -n "$ns" patch cloneset "$name" --type merge \
    -p "{\"spec\":{\"updateStrategy\":{\"partition\":$((replicas - done_pods < 0 ? 0 : replicas - done_pods))}}}"
  kubectl -n "$ns" wait --for=jsonpath='{.status.updatedReadyReplicas}'="$done_pods" \
    cloneset/"$name" --timeout=30m
done
dfget prewarm "$image" --batches "$plan" --timeout 30m --wait
kubectl -n "$ns" patch cloneset "$name" --type merge -p '{"spec":{"updateStrategy":{"partition":0}}}'
