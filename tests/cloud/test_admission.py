"""cloud.admission + the upload door, fuzzed (issue 11, done-when): 10,000 generated upload bodies
(seeded mutations of valid ones) never crash the parser, and whatever it accepts is usable; a
subset through the real app changes the store only when it answers 200."""
from __future__ import annotations

import base64
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from PIL import Image

from cloud.admission import image_problem, sample_problem
from cloud.server import create_app, parse_upload
from device.contracts.config import load_settings
from device.contracts.wire import TokenStats, UplinkSample, VisualTokens

JUNK = ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1e308", "0", "-1", "null", "true", '"x"',
        "[]", "{}", "99999999999999999999999", "1.5", '"' + "A" * 300 + '"', '"\\u0000"', '"\\ud800"']


def _png(rng: np.random.Generator, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _valid(i: int, rng: np.random.Generator) -> dict:
    vt = VisualTokens(indices=[0, 2], n_total=4, dim=3, data=base64.b64encode(bytes(12)))
    s = UplinkSample(sample_id=f"{i:016x}", base_model="m0", prompt="q?", answer="a",
                     image=base64.b64encode(_png(rng)), image_format="png", visual_tokens=vt,
                     tokens=TokenStats(positions=[0, 1], token_ids=[3, 4], entropy=[0.5, 1.5]),
                     score=0.7, ood_score=1.2, raw_bytes=100)
    return s.model_dump(mode="json")


def _mutate(body: str, rnd: random.Random) -> str:
    kind = rnd.randrange(7)
    if kind == 0:  # replace one JSON value (after a ':') by junk
        cuts = [k for k, ch in enumerate(body) if ch == ":"]
        k = rnd.choice(cuts) + 1
        end = k
        while end < len(body) and body[end] not in ",}]":
            end += 1
        return body[:k] + rnd.choice(JUNK) + body[end:]
    if kind == 1:  # flip bytes
        b = bytearray(body.encode())
        for _ in range(rnd.randint(1, 5)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        return b.decode("utf-8", "replace")
    if kind == 2:  # truncate
        return body[: rnd.randrange(len(body))]
    if kind == 3:  # corrupt the image's base64 (still valid base64 sometimes)
        obj = json.loads(body)
        img = obj["samples"][0]["image"]
        pos = rnd.randrange(len(img))
        obj["samples"][0]["image"] = img[:pos] + rnd.choice(["AAAA", "====", "!!", ""]) + img[pos + 4:]
        return json.dumps(obj)
    if kind == 4:  # inconsistent arrays
        obj = json.loads(body)
        key = rnd.choice(["positions", "token_ids", "entropy"])
        obj["samples"][0]["tokens"][key] = obj["samples"][0]["tokens"][key][:1]
        return json.dumps(obj)
    if kind == 5:  # visual tokens out of range / wrong length
        obj = json.loads(body)
        vt = obj["samples"][0]["visual_tokens"]
        vt[rnd.choice(["indices", "data"])] = rnd.choice([[0, 9], "AAAA", [-1]])
        return json.dumps(obj)
    obj = json.loads(body)  # drop or add a field
    sample = obj["samples"][0]
    if rnd.random() < 0.5:
        sample.pop(rnd.choice(list(sample)))
    else:
        sample[rnd.choice(["extra", "score2", "__proto__"])] = 1
    return json.dumps(obj)


def _all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def generated(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    bases = [json.dumps({"samples": [_valid(i, rng)]}) for i in range(8)]
    for k in range(n):
        body = bases[k % len(bases)]
        for _ in range(rnd.randint(0, 2)):
            try:
                body = _mutate(body, rnd)
            except (ValueError, KeyError, TypeError, IndexError):  # mutated into non-JSON already
                break
        yield body


def test_ten_thousand_generated_bodies_never_crash_the_door() -> None:
    accepted = refused = 0
    for body in generated(10_000):
        try:
            request = parse_upload(body.encode("utf-8", "surrogatepass"))
        except RequestValidationError as exc:
            refused += 1
            assert exc.errors() and all("loc" in e for e in exc.errors())
            continue
        accepted += 1
        for s in request.samples:  # what passes is usable by a round
            assert sample_problem(s) is None and _all_finite(s.model_dump())
    print(f"10,000 bodies: {accepted} accepted, {refused} refused with 422")
    assert accepted > 500 and refused > 5_000  # the generator exercises both sides


def test_generated_bodies_through_the_app_change_the_store_only_on_200(tmp_path: Path) -> None:
    app = create_app(load_settings(home=tmp_path))
    client = TestClient(app)
    h = {"Authorization": f"Bearer {app.state.store.add_device('lap')}",
         "Content-Type": "application/json"}
    blobs = tmp_path / "cloud" / "blobs"

    def state():
        return (app.state.store.sample_counts("lap").total,
                sorted(p.name for p in blobs.rglob("*") if p.is_file()))

    seen: dict[int, int] = {}
    for body in generated(400, seed=1):
        before = state()
        r = client.post("/v1/samples", content=body.encode("utf-8", "surrogatepass"), headers=h)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 422), r.text
        if r.status_code != 200:
            assert state() == before
            assert "\n" not in r.json()["detail"]
    assert seen.get(200) and seen.get(422)
    app.state.rounds.shutdown()
    app.state.store.close()


@pytest.mark.parametrize("data,declared,ok", [
    (None, "png", True), (b"", "png", False), (b"GIF89a" + bytes(20), None, False), (None, "webp", False),
])
def test_image_problem(data, declared, ok) -> None:
    data = _png(np.random.default_rng(0)) if data is None else data
    assert (image_problem(data, declared) is None) == ok
