"""On the embedded models, the device is less sure about target-domain images than source ones:
the evidence that UTS picks the right samples (AUROC figures are in the issue's closing note)."""
import numpy as np

from cloud.zoo import scenes
from device.contracts.feature_stats import FeatureStats
from device.runtime import Runtime, RuntimeConfig
from device.uncertainty import UncertaintyRecorder
from device.uts import token_ood


def test_target_domains_get_higher_uncertainty_than_source(assets):
    stats = FeatureStats.load(assets / "feature_stats.npz")
    ent, ood = {}, {}
    with Runtime(RuntimeConfig(assets / "student-q4_0.gguf", assets / "mmproj-f32.gguf", n_threads=1)) as rt:
        for d in scenes.DOMAINS:
            e, o = [], []
            for s in scenes.generate(d, 60, 31):
                rec = UncertaintyRecorder()
                g = rt.generate(s.question, s.image, logits_hook=rec)
                e.append(rec.summary().mean_entropy)
                o.append(float(token_ood(g.visual_embeddings, stats).mean()))
            ent[d], ood[d] = float(np.mean(e)), float(np.mean(o))
    for d in scenes.TARGET_DOMAINS:
        assert ent[d] > ent["source"], (d, ent)
    # the input-side OOD score also ranks the pixel-level shifts above the source domain
    for d in ("texture", "noise"):
        assert ood[d] > ood["source"], (d, ood)
