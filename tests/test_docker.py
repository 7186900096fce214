"""The container files: no engine runs here, so check what a user of them relies on."""

from __future__ import annotations

from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_compose_has_a_scheduler_cpu_workers_and_a_gpu_worker_on_shared_data():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"scheduler", "cpu-worker", "gpu-worker"} <= set(services)
    assert "8786:8786" in services["scheduler"]["ports"]
    assert "8787:8787" in services["scheduler"]["ports"]  # the dashboard
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["command"][5:7] == ["--resources", "GPU=1"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # the client assembles what the workers wrote: it needs their volume and the scheduler
    client = services["client"]
    assert client["environment"]["DASK_SCHEDULER_ADDRESS"] == "tcp://scheduler:8786"
    for name, svc in services.items():
        cmd = svc["command"]
        if name not in ("scheduler", "client"):
            assert cmd[:3] == ["dask", "worker", "tcp://scheduler:8786"]
            # torch, not Dask, uses the cores; a GPU worker reads one block while the model
            # runs another
            threads = "2" if name == "gpu-worker" else "1"
            assert cmd[cmd.index("--nthreads") + 1] == threads
        assert "data:/data" in svc["volumes"]
    assert "data" in compose["volumes"]


def test_images_run_as_a_user_and_pin_their_base():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        bases = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
        assert bases and all(":" in b and not b.endswith(":latest") for b in bases)
        assert "USER 1000:1000" in text and "torch==2.13.0" in text
        # every process in the image reads geoseg's Dask settings
        assert "COPY geoseg/dask.yaml /etc/dask/geoseg.yaml" in text
