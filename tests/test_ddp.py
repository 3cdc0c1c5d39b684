import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_stage_change.py")


def test_two_process_ddp_keeps_replicas_identical_through_an_unfreeze(tmp_path):
    """cf. Lightning issue 20340: parameters unfrozen after DDP wrapped the model must still be
    synchronised; here both processes must end with the same weights."""
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    weights = [name for name in ranks[0]["final"] if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]) for name in weights)
    backbone = [name for name in weights if not name.startswith("fc.")]
    assert all(not torch.equal(ranks[0]["initial"][name], ranks[0]["final"][name]) for name in backbone)
