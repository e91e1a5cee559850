"""Twin fidelity: how closely the cloud's HF twin predicts what the device (llama.cpp) does.

Why every round measures it: llama.cpp quantizes activations inside quantized matmuls and uses
fp16 GELU tables, so a float twin is "device + noise"; a patch chosen on the twin helps the device
only as far as the two agree.  On a probe set we run both greedily and report the fraction of
identical answers and the max |logit| gap over the device's own decode steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .families import Twin, collate


def fidelity(twin: Twin, files: dict[str, Path], probes: Sequence[tuple[np.ndarray | None, str]],
             max_tokens: int = 8, threads: int = 1, model: torch.nn.Module | None = None,
             kv_cache: str | None = None, runtime=None) -> dict:
    """``{"n", "greedy_agreement", "max_logit_gap", "device_answers", "twin_answers"}`` for the
    device files ``files`` and the twin (or ``model`` with the twin's layout).  The device runs
    with its own default configuration (f16 KV cache) unless ``kv_cache`` says otherwise: the
    figure is about what the user's device does, not a parity setup.  ``runtime``: a
    ``device.runtime.Runtime`` already loaded on ``files`` (a round measures fidelity and accuracy
    on one load); it is left open, and ``threads`` / ``kv_cache`` are then its own."""
    from device.runtime import RuntimeConfig, reuse_or_open

    fam, m = twin.family, model or twin.model
    gaps, agree, dev_ans, twin_ans = [], 0, [], []
    cfg = RuntimeConfig(Path(files["model"]), files.get("mmproj"), n_threads=threads)
    if kv_cache is not None:
        cfg.kv_cache = kv_cache
    with reuse_or_open(runtime, cfg) as rt:
        for img, q in probes:
            steps: list[np.ndarray] = []
            gen = rt.generate(q, img, max_tokens=max_tokens, logits_hook=lambda lg: steps.append(np.array(lg)))
            ex = fam.example(twin, q, img)
            n0 = len(ex.input_ids)
            ex.input_ids = ex.input_ids + gen.token_ids
            with torch.no_grad():
                lg = m(**collate([ex], twin.meta.get("pad_id", 0))).logits[0, n0 - 1:n0 - 1 + len(steps)].numpy()
            gaps.append(float(np.abs(lg[:, :steps[0].shape[0]] - np.stack(steps)).max()))
            mine = fam.generate(twin, fam.example(twin, q, img), max_new_tokens=max_tokens, model=m)
            agree += mine == gen.token_ids
            dev_ans.append(gen.text)
            twin_ans.append(fam.decode(twin, mine))
    n = len(probes)
    return {"n": n, "greedy_agreement": agree / n if n else float("nan"),
            "max_logit_gap": max(gaps) if gaps else float("nan"), "device_answers": dev_ans, "twin_answers": twin_ans}


def main(argv: list[str] | None = None) -> None:
    """``python -m cloud.fidelity BUILD_DIR [N]``: device-vs-twin figures for every
    ``student-*.gguf`` of a build folder (with its ``mmproj-f32.gguf``) on the first N eval images."""
    import sys
    import time

    from device.contracts.dataset import read_llava
    from device.contracts.image import load_image

    from .families import family_for

    args = sys.argv[1:] if argv is None else argv
    build, n = Path(args[0]), int(args[1]) if len(args) > 1 else 40
    torch.set_num_threads(1)
    every = read_llava(build / "data" / "eval.json")
    qas = every[:: max(1, len(every) // n)][:n]  # spread over the file's domains
    mmproj = build / "mmproj-f32.gguf"
    for model in sorted(build.glob("student-*.gguf")):
        t = time.time()
        twin = family_for(model, mmproj).load_twin(model, mmproj)
        size = twin.meta["geometry"].image_size
        f = fidelity(twin, {"model": model, "mmproj": mmproj}, [(load_image(q.image, size), q.question) for q in qas])
        print(f"{model.name}: family {twin.family.name}, greedy agreement {f['greedy_agreement']:.3f} "
              f"(n={f['n']}), max logit gap {f['max_logit_gap']:.4f}, {time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
