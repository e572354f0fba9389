"""What counts as drift: wanted fields differ; fields the server adds do not."""

from __future__ import annotations

from sloserve.operator.applier import contains


def test_server_additions_are_not_drift() -> None:
    want = {"spec": {"ports": [{"name": "grpc", "port": 50051}], "clusterIP": "None"}}
    have = {
        "metadata": {"uid": "x", "resourceVersion": "7"},
        "spec": {
            "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP", "targetPort": 50051}],
            "clusterIP": "None",
            "sessionAffinity": "None",
        },
    }
    assert contains(want, have)


def test_changed_or_missing_wanted_fields_are_drift() -> None:
    want = {"spec": {"replicas": 3, "template": {"spec": {"containers": [{"image": "a"}]}}}}
    assert not contains(want, {"spec": {"replicas": 5, "template": want["spec"]["template"]}})
    assert not contains(
        want, {"spec": {"replicas": 3, "template": {"spec": {"containers": [{"image": "b"}]}}}}
    )
    two = {"spec": {"replicas": 3, "template": {"spec": {"containers": [{"image": "a"}] * 2}}}}
    assert not contains(want, two)  # an extra container is drift too
    assert not contains(want, {})


def test_quantities_compare_by_value() -> None:
    assert contains({"cpu": "0.5", "memory": "1Gi"}, {"cpu": "500m", "memory": "1073741824"})
    assert not contains({"cpu": "1"}, {"cpu": "500m"})
    assert contains({"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "1"})
