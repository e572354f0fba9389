"""A real Kubernetes control plane on one machine, without containers, for tests and dev.

etcd, kube-apiserver 1.20.2, kube-controller-manager and kube-scheduler run as local
processes (`controlplane.py`); a fake kubelet (`kubelet.py`) registers a Node and reports the
pods bound to it Running and Ready, so Deployments, ReplicaSets, garbage collection, RBAC and
Endpoints behave as in a real cluster. `cluster.py` puts the two together; `sloserve
devcluster up` runs it by hand. The binaries come from `make control-plane`
(scripts/k8s/build-control-plane.sh).
"""
