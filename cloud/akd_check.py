"""Multi-process check of AKD under ``accelerate launch``: distils on an HF default build (the
family seam: twin from its Q4_0 GGUF pair, its HF teacher) and prints, from the main process, the
number of processes, the loss and the merged weights' checksum.

    torchrun --standalone --nproc_per_node 2 -m cloud.akd_check [BUILD_DIR]  # 2 CPU processes (gloo)
    accelerate launch --num_processes 2 -m cloud.akd_check [BUILD_DIR] # the same on a multi-GPU machine
    python -m cloud.akd_check [BUILD_DIR]                            # 1 process, same code

BUILD_DIR defaults to the embedded default (assets/default).
Measured on the 2-core machine, shipped default, 20 steps: 1 process -> loss 1.2155, CE 0.77 -> 0.06
(6 s); 2 processes -> loss 1.1359, CE 0.76 -> 0.03 (8 s; each rank draws its own batches, DDP
averages the gradients).  tests/cloud/test_akd_multiprocess.py checks this.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from device.contracts.config import DEFAULT_MODEL_DIR


def main(build: Path = DEFAULT_MODEL_DIR, steps: int = 20) -> None:
    torch.set_num_threads(1)
    from .zoo.hf_assets import is_build_folder

    if not is_build_folder(build):
        raise SystemExit(f"{build}: not a cdcca build folder (no teacher/config.json + manifest.json)")
    from .akd import AKDConfig, DistillSet, distil_twin
    from .families import family_for
    from .families.teacher import Teacher
    from .round_job import _images
    from device.contracts.dataset import read_llava

    model = next(p for p in (build / "student-q4_0.gguf", build / "student-f32.gguf") if p.is_file())
    mmproj = build / "mmproj-f32.gguf"
    twin = family_for(model, mmproj).load_twin(model, mmproj)
    teacher = Teacher(build / "teacher")
    qas = [q for q in read_llava(build / "data" / "eval.json") if q.meta.get("domain") == "noise"][:32]
    imgs, qs = _images(qas, twin.meta["geometry"].image_size), [q.question for q in qas]
    dset = DistillSet(np.stack(imgs), qs, teacher.answer(imgs, qs), [[0]] * len(qs))
    ce: list[float] = []
    merged, stats = distil_twin(twin, teacher, dset, None, AKDConfig(steps=steps, batch_size=16),
                                on_step=lambda i, terms: ce.append(terms["ce"]))
    _report(merged, stats, ce)


def _report(merged, stats, ce: list[float]) -> None:
    """One line from the main process: processes, final loss, CE of the first / last 3 steps (this
    rank's batches), and a checksum of the merged weights."""
    state = PartialState()
    if state.is_main_process:
        checksum = float(sum(p.double().abs().sum() for p in merged.parameters()))
        print(f"processes={state.num_processes} loss={stats['loss']:.4f} ce_first={np.mean(ce[:3]):.4f} "
              f"ce_last={np.mean(ce[-3:]):.4f} merged_checksum={checksum:.6f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL_DIR)
