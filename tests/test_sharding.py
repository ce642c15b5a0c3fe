"""Dataset sharding for real: two processes started by `accelerate launch` give what one process gives.

`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.x sends `--cpu` to its simple
launcher, which runs multi-CPU only through mpirun), so it cannot test sharding. On a machine without CUDA,
`--multi_gpu --num_processes 2` goes through torch.distributed.run and gives two CPU workers
(``DistributedType.MULTI_CPU``), each of which ``process_share`` maps to its share of the identities.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dladiff.config import load_config
from dladiff.dataset import ProcessShare, protect_dataset

FAST = """inherit: smoke
runtime:
  device: cpu
surrogate:
  steps: 1
layer1:
  epochs: 1
  stage1_steps: 1
  stage2_steps: 1
  stage3_steps: 1
  checkpoint_every: 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(root: Path) -> dict:
    """Per identity: the saved pixels and the report entries that depend on the result (no paths, no times)."""
    found = {}
    for report_path in sorted(root.glob("*/report.json")):
        report = json.loads(report_path.read_text())
        found[report_path.parent.name] = {
            "images": {e["output"]: np.asarray(Image.open(report_path.parent / e["output"])) for e in report["images"]},
            "entries": [{k: e[k] for k in ("input", "linf_255", "psnr_db")} for e in report["images"]],
            "history": report["layer1"]["history"],
        }
    return found


def test_two_accelerate_cpu_processes_give_the_one_process_result(tmp_path, tiny_sd, real_photos):
    pytest.importorskip("accelerate")
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine --multi_gpu would start GPU workers; this test is about CPU workers")
    data = tmp_path / "data"
    photos = {"ann": real_photos["hanks"], "bob": real_photos["astronaut"][:200, 150:350]}
    for name, pixels in photos.items():
        (data / name).mkdir(parents=True)
        Image.fromarray(pixels).save(data / name / "photo.png")
    config = tmp_path / "fast.yaml"
    config.write_text(FAST)
    dladiff = Path(sys.executable).parent / "dladiff"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(dladiff), "protect", str(data), "--out", str(tmp_path / "two"), "--dataset", "--layers", "1",
         "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    counts = sorted(line.split()[1] for line in launched.stdout.splitlines() if line.startswith("protected "))
    assert counts == ["1", "1"], launched.stdout  # process 0 took ann, process 1 bob (not both each)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = protect_dataset(data, tmp_path / "one", load_config(config), layers=(1,), quiet=True,
                                 share=ProcessShare(0, 1, "cpu"))
    finally:
        torch.set_num_threads(previous)
    assert single.protected == ["ann", "bob"]
    two, one = outputs(tmp_path / "two"), outputs(tmp_path / "one")
    assert sorted(two) == sorted(one) == ["ann", "bob"]
    for name in one:
        assert two[name]["entries"] == one[name]["entries"]
        assert two[name]["history"] == one[name]["history"]
        for image, pixels in one[name]["images"].items():
            assert np.array_equal(two[name]["images"][image], pixels), (name, image)
        assert one[name]["entries"][0]["linf_255"] > 0
