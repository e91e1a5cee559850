"""Multi-process check of AKD under ``accelerate launch``: distils on the embedded models and
prints, from the main process, the number of processes, the loss and the merged weights' checksum.

    torchrun --nproc_per_node 2 -m cloud.akd_check        # 2 CPU processes (gloo); Accelerator reads the env
    accelerate launch --num_processes 2 -m cloud.akd_check  # the same on a multi-GPU machine
    python -m cloud.akd_check                             # 1 process, same code

Measured on the 2-core machine (20 steps): 1 process -> loss 7.5793; 2 processes -> loss 7.2482
(each rank draws its own batches, DDP averages the gradients).
"""
from __future__ import annotations

import numpy as np
import torch
from accelerate import PartialState

from device.contracts.config import DEFAULT_MODEL_DIR

from .akd import AKDConfig, DistillSet, distil, pseudo_label
from .zoo import scenes
from .zoo.build import load_pt
from .zoo.data import Codec
from .zoo.gguf_load import load_gguf_pair


def main(steps: int = 20) -> None:
    torch.set_num_threads(1)
    twin, tok = load_gguf_pair(DEFAULT_MODEL_DIR / "student-q4_0.gguf", DEFAULT_MODEL_DIR / "mmproj-f32.gguf")
    codec, teacher = Codec(tok), load_pt(DEFAULT_MODEL_DIR / "teacher.pt")
    s = scenes.generate("noise", 64, 3)
    imgs, qs = np.stack([x.image for x in s]), [x.question for x in s]
    dset = DistillSet(imgs, qs, pseudo_label(teacher, codec, imgs, qs), [[0]] * len(qs))
    merged, stats = distil(twin, teacher, codec, dset, None, AKDConfig(steps=steps, batch_size=16))
    state = PartialState()
    if state.is_main_process:
        checksum = float(sum(p.double().abs().sum() for p in merged.parameters()))
        print(f"processes={state.num_processes} loss={stats['loss']:.4f} merged_checksum={checksum:.6f}")


if __name__ == "__main__":
    main()
