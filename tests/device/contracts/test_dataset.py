import json

import pytest

from cloud.zoo.llava_io import write_generated
from device.contracts.dataset import DatasetError, read_llava


def test_round_trip_generated(tmp_path):
    p = write_generated(tmp_path, "source", 12, 0)
    qas = read_llava(p)
    assert len(qas) == 12 and all(q.image.is_file() and q.answer and "<image>" not in q.question for q in qas)
    assert qas[0].meta["domain"] == "source"


@pytest.mark.parametrize("bad,needle", [
    ([{"id": "x", "conversations": [{"from": "human", "value": "hi"}]}], "record 0 (id='x')"),
    ([{"id": "y", "image": "missing.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}], "image file not found"),
    ([{"id": "z", "conversations": [{"from": "gpt", "value": "q"}, {"from": "human", "value": "a"}]}], "human then gpt"),
    (["not a dict"], "record 0"),
])
def test_malformed_records_name_file_and_record(tmp_path, bad, needle):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(DatasetError) as e:
        read_llava(p)
    assert str(p) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_invalid_json(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_llava(p)
