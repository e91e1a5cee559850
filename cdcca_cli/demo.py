"""`cdcca demo` (what `make demo` runs): the whole product on the embedded models, offline.

A loopback cloud starts in this process; the device answers a stream of questions about images,
mostly in-distribution with a drift (round 1: noise/texture, round 2: unseen combos/rotations;
cloud.zoo.streams), UTS keeps the uncertain ones, and two `sync` rounds distil the HF teacher into
the device through GGUF patches.  Every accuracy is the device's own (llama.cpp) on the build's
held-out set, with its 95 % interval; each round's gain on its drifted domains is paired.  Everything
runs under a fresh CDCCA_HOME so the user's own data is never touched.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from .common import console, one_line_errors, round_option
from .main import app


def _chat_stream(settings, domains, n: int, seed: int, img_dir: Path, show: int = 3) -> None:
    from PIL import Image

    from cloud.zoo.streams import DRIFT_SOURCE_FRACTION, drift_stream
    from device.models import open_device_model
    from device.queue import Queue
    from device.session import ChatSession

    from .render import shaded

    dm = open_device_model(settings)
    with Queue(settings.queue_path) as q:
        sess = ChatSession.open(dm, settings.threads, settings.n_ctx, q)
        t0, kept, shown = time.time(), 0, 0
        for i, s in enumerate(drift_stream(n, domains, seed)):
            p = img_dir / f"{seed}-{i}-{s.domain}.png"
            Image.fromarray(s.image).save(p)
            turn = sess.ask(s.question, image=p)
            kept += turn.queued
            if shown < show and turn.queued:
                shown += 1
                console.print(f"  [{s.domain}] {s.question}  ->  ", shaded(turn.pieces, [t.entropy for t in turn.tokens]),
                              f"  [dim](truth: {s.answer}; UTS {turn.decision.reason})[/]")
        sess.close()
        st = q.stats()
    console.print(f"  {n} chats ({100 * DRIFT_SOURCE_FRACTION:.0f} % source) in {time.time() - t0:.1f}s; UTS kept {kept} "
                  f"({st.pending_bytes:,} B queued vs {st.seen_raw_bytes:,} B raw for every chat so far)")


@app.command()
def demo(
    chats: int = typer.Option(400, help="chats per round (70 % source, 30 % the round's drifted domains)"),
    steps: int = round_option("steps", "--steps", help="cloud distillation steps per round"),
    budget: int = round_option("downlink_budget_bytes", "--budget", help="largest patch file in bytes"),
    home: Optional[Path] = typer.Option(None, help="data folder (default: a fresh temporary one)"),
):
    """Run two cloud-device rounds end to end on the embedded models (offline, loopback)."""
    with one_line_errors():
        home = home or Path(tempfile.mkdtemp(prefix="cdcca-demo-"))
        os.environ["CDCCA_HOME"] = str(home)
        from cloud.loopback import LoopbackCloud
        from cloud.zoo.streams import ROUND_DRIFTS
        from device.contracts.config import load_settings
        from device.contracts.wire import RoundOptions
        from device.sync import SyncOptions
        from device.uplink import CloudClient

        from .sync_cmd import report_table, run_with_progress

        settings = load_settings()
        console.rule("[bold]cdcca demo[/]")
        console.print(f"data folder: {home}")
        img_dir = home / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        with LoopbackCloud(settings) as cloud:
            console.print(f"cloud: {cloud.url} (loopback); teacher = the embedded HF Idefics3 teacher (assets/default/teacher)")
            client = CloudClient(cloud.url, cloud.add_device("demo-laptop"))
            ro = RoundOptions(steps=steps, downlink_budget_bytes=budget)
            opts = SyncOptions(ro, eval_per_domain=None)
            history = []
            for r, domains in enumerate(ROUND_DRIFTS, 1):
                console.rule(f"round {r}: the user's images drift to {' + '.join(domains)}")
                _chat_stream(settings, domains, chats, 100 * r, img_dir)
                rep = run_with_progress(settings, client, opts)
                console.print(report_table(rep))
                history.append(rep)
        _summary(history)


def _summary(history) -> None:
    from rich.table import Table

    from cloud.zoo.streams import ROUND_DRIFTS
    from device.contracts.round_metrics import paired_gain

    first = history[0].accuracy_before["domains"]
    t = Table(title="device accuracy (llama.cpp, held-out set; 95 % Wilson interval) over rounds")
    t.add_column("domain")
    t.add_column("start")
    for i in range(len(history)):
        t.add_column(f"after round {i + 1}")
    cell = lambda a: f"{a['vqa']:.3f} [{a['vqa_ci'][0]:.2f}, {a['vqa_ci'][1]:.2f}]" if "vqa_ci" in a else f"{a['vqa']:.3f}"  # noqa: E731
    for d in first:
        t.add_row(d, cell(first[d]), *[cell(h.accuracy_after["domains"][d]) for h in history])
    t.add_row("all", f"{history[0].accuracy_before['vqa']:.3f}", *[f"{h.accuracy_after['vqa']:.3f}" for h in history])
    console.print(t)
    for i, (h, domains) in enumerate(zip(history, ROUND_DRIFTS), 1):
        g = paired_gain(h.accuracy_before, h.accuracy_after, domains)
        if g is not None:
            verdict = "a gain" if g[1] > 0 else ("a loss" if g[2] < 0 else "no significant change")
            console.print(f"round {i}: {' + '.join(domains)} {100 * g[0]:+.1f} points (paired 95 % interval "
                          f"[{100 * g[1]:+.1f}, {100 * g[2]:+.1f}]): {verdict}")
    up = sum(h.uplink_bytes for h in history)
    raw = sum(h.uplink_raw_bytes for h in history)
    down = sum(h.downlink_bytes for h in history)
    console.print(f"uplink {up:,} B for the kept samples (raw {raw:,} B); downlink {down:,} B in {len(history)} patches "
                  f"(full GGUF {history[0].full_gguf_bytes:,} B each time otherwise)")
