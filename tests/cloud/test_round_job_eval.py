from device.contracts.dataset import QA
from cloud.round_job import spread


def qa(i, d):
    return QA(id=str(i), image=None, question="q", answer="a", meta={"domain": d})


def test_eval_subset_covers_every_domain_in_order():
    qas = [qa(i, d) for i, d in enumerate(["source"] * 5 + ["noise"] * 5 + ["combo"] * 5)]
    got = spread(qas, 6)
    assert [q.meta["domain"] for q in got] == ["source", "noise", "combo"] * 2
    assert [q.id for q in got[:3]] == ["0", "5", "10"]
    assert spread(qas, None) == qas and spread(qas, 100) == qas
