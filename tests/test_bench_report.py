"""The bench report on known records: groups, the table's statistics and ratios, the sweep table, the plots."""

from __future__ import annotations

import pytest

from latent_relay.relay.bench_report import groups, markdown_report, settings_label, write_plots
from latent_relay.relay.results import ItemResult

SETTINGS = {
    "latent_steps": 10,
    "latent_input": {"mode": "soft", "temperature": 1.0, "ridge": 1e-5},
    "decoding": {"max_new_tokens": 512, "greedy": True, "temperature": 0.7, "seed": 0},
}


def _records(relay, graph, outcomes, seconds, size, settings=SETTINGS):
    return [
        ItemResult(
            item_id=str(i),
            task="gsm8k",
            graph=graph,
            relay=relay,
            model="m",
            correct=ok,
            seconds=seconds,
            relay_bytes=size,
            output_tokens=100,
            settings=settings,
        )  # fmt: skip
        for i, ok in enumerate(outcomes)
    ]


def _grid(settings=SETTINGS):
    # 20 items: text right on 0-13, latent on 0-11 and 14-15, the recipe on 0-9
    return (
        _records("single", "single", [i < 10 for i in range(20)], 10.0, 0, settings)
        + _records("text", "sequential", [i < 14 for i in range(20)], 60.0, 3000, settings)
        + _records("latent", "sequential", [i < 12 or i in (14, 15) for i in range(20)], 20.0, 20_000_000, settings)
        + _records("latent+l:budget=8+int4", "sequential", [i < 10 for i in range(20)], 15.0, 2_000_000, settings)
    )


def _row(report: str, method: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_table_carries_intervals_paired_tests_and_ratios():
    report = markdown_report(_grid())
    latent = _row(report, "latent")
    assert latent[1] == "14/20 (70%) [48-85]"  # Wilson interval of 14/20: 48.1%-85.5%
    assert latent[2] == "+2/-2 of 20, p=1"  # items 14,15 only latent; 12,13 only text
    assert latent[5:7] == ["20.0", "3.0x"]  # s/problem, speed-up against text's 60 s
    recipe = _row(report, "latent+l:budget=8+int4")
    assert recipe[3] == "+0/-4 of 20, p=0.12"  # against full latent: 4 discordant, all losses: 2 * 1/16
    assert recipe[7:9] == ["2.0 MB", "10.0x smaller"]
    assert _row(report, "single")[2] == "+0/-4 of 20, p=0.12"


def test_single_joins_every_graph_of_its_decoding_and_groups_split_by_settings():
    other = {**SETTINGS, "latent_steps": 5}
    found = groups(_grid() + _grid(other)[20:])  # the second grid without its own single run
    assert [(g.graph, g.settings["latent_steps"], len(g.records)) for g in found] == [
        ("sequential", 10, 80),
        ("sequential", 5, 80),
    ]
    report = markdown_report(_grid() + _grid(other)[20:])
    assert "## Sweep: gsm8k, graph sequential" in report
    assert "5 thoughts, soft tokens (T=1.0), greedy, budget 512 | latent |" in report


def test_settings_labels_say_what_ran():
    sampled = {**SETTINGS, "latent_input": {"mode": "realign"}, "decoding": {"greedy": False, "temperature": 0.7}}
    assert settings_label(SETTINGS) == "10 thoughts, soft tokens (T=1.0), greedy, budget 512"
    assert "ridge-realigned hidden states, sampled (T=0.7" in settings_label(sampled)


def test_plots_are_written_per_group(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_plots(_grid(), tmp_path)
    assert [p.name for p in paths] == ["01-gsm8k-sequential-accuracy-vs-bytes.png", "01-gsm8k-sequential-seconds.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
