"""Running a pretraining config on several GPUs of this machine through torchrun (DDP or FSDP2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..files import write_text_atomic


def run_torchrun(cfg, gpus: int, resume: bool, log: Callable[[str], None] = print) -> dict:
    """Write the config and a launch.sh beside it in cfg.out_dir, run it through torchrun on `gpus` processes,
    and return the run's summary (with `model_dir`, the exported model)."""
    import yaml
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "pretrain.yaml"
    write_text_atomic(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "phikit", "train", "--config", str(config_file)] + (["--resume"] if resume else [])
    write_text_atomic(run_dir / "launch.sh", "#!/usr/bin/env bash\n# multi-node: replace --standalone with "
                      "--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:29500\n"
                      + " ".join(cmd[2:]).replace("torch.distributed.run", "torchrun") + "\n")
    log(f"  launching {' '.join(cmd)}")
    subprocess.run(cmd, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["model_dir"] = str(run_dir / "model")
    return summary
