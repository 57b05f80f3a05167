#!/usr/bin/env bash
# Certificates and keys of the local cluster, in target/cluster/pki, signed by one
# local CA. Kept across runs; each one that is missing is generated, so a pki/ made
# before a certificate was added gets the new one without a new CA (up.sh and
# node-up.sh both call this; it is quiet when nothing is missing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pki="$(cd "$here/../.." && pwd)/target/cluster/pki"
mkdir -p "$pki"
cd "$pki"

# The node's name: the kubelet's client certificate names it (the Node authorizer
# and NodeRestriction let system:node:<name> change only its own Node and pods).
node=${SHOAL_NODE_NAME:-shoal-node-0}
node_ip=${SHOAL_NODE_IP:-10.244.0.1}

say() { echo "Generating $* in $pki"; }

if [[ ! -f ca.key || ! -f ca.crt ]]; then
  # A certificate without its CA is of no use: start over.
  rm -f ./*.crt ./*.key ./*.pub ./*.srl
  say "a CA"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
    -subj "/CN=shoal-local-ca" 2>/dev/null
fi

sign() { # name subject extensions
  [[ -f "$1.crt" && -f "$1.key" ]] && return 0
  say "$1"
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -out "$1.crt" -extfile <(printf '%s\n' "$3") 2>/dev/null
  rm -f "$1.csr"
}
sign apiserver "/CN=kube-apiserver" \
  "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
sign admin "/O=system:masters/CN=shoal-admin" "extendedKeyUsage=clientAuth"
# The API server's client certificate towards kubelets (kubectl logs, exec,
# port-forward): system:masters passes the kubelet's webhook authorization.
sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
# The real node (node-up.sh): the kubelet's client and serving certificates and
# kube-proxy's client certificate (system:kube-proxy is bound to
# system:node-proxier by the default RBAC policy).
sign "kubelet-$node" "/O=system:nodes/CN=system:node:$node" "extendedKeyUsage=clientAuth"
sign "kubelet-$node-serving" "/CN=$node" \
  "subjectAltName=IP:$node_ip,IP:127.0.0.1,DNS:$node
extendedKeyUsage=serverAuth"
sign kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
if [[ ! -f service-account.key || ! -f service-account.pub ]]; then
  say "service-account keys"
  openssl genrsa -out service-account.key 2048 2>/dev/null
  openssl rsa -in service-account.key -pubout -out service-account.pub 2>/dev/null
fi
